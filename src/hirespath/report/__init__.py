"""The paper's tables and Figure 1 from finished runs."""
