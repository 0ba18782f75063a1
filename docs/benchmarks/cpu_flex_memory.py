"""Peak live tensor memory of one encoder forward through the flex (or varlen) kernel, measured on CPU (no GPU).

The flex kernel is CUDA's inference path; on CPU it runs compiled by inductor here, so that its memory is the
kernel's and not uncompiled flex's full score matrix. The live bytes are summed from torch.profiler's memory
events (every allocation and free of the CPU allocator, in time order), so the peak is what tensors hold, not what
an allocator keeps. Prints the peak over the weights in MB and in units of one token tensor (tokens × dim), the
unit in which the GPU peak scales: UNI2-h bf16 at 3,430 px, one unit is 184 MB.

    python docs/benchmarks/cpu_flex_memory.py 3430 384          # resolution, width (UNI2-h: 1536; 6 blocks, prune @4)
    python docs/benchmarks/cpu_flex_memory.py 3430 384 cuda     # the MLP in CUDA's token chunks, not CPU's
    python docs/benchmarks/cpu_flex_memory.py 3430 384 cuda varlen  # the varlen kernel instead of flex

On CPU the MLP runs in chunks of a few MB (cache-sized); on CUDA in much larger ones, so ``cuda`` makes the CPU
forward chunk its MLP as a CUDA forward would: the peak a GPU sees. ``varlen``: the varlen kernel, with
``varlen_attn`` (flash attention, CUDA only) replaced by a CPU function of its contract that attends block by block
(its own temporaries are one block's scores); its chunk of gathered keys scales with the width as the tokens × dim
unit does, so the peak in units is UNI2-h's.
"""

import sys

import torch
from torch.nn.attention.flex_attention import flex_attention

import hirespath
from hirespath.models import HiResEncoder, attention

size, dim = int(sys.argv[1]), int(sys.argv[2])
cuda_mlp = "cuda" in sys.argv[3:]
backend = "varlen" if "varlen" in sys.argv[3:] else "flex"
attention._FLEX["cpu"] = torch.compile(flex_attention, dynamic=False)
attention._VARLEN["cpu"] = attention.varlen_reference
torch.manual_seed(0)
enc = hirespath.create_encoder(
    "uni2_h", attention="sparse", window=8, prune_ratio=0.6, prune_layer=4, sparse_backend=backend,
    depth=6, embed_dim=dim, num_heads=dim // 64, init_values=1.0, cpu_parallel="ops",
).eval().to(torch.bfloat16)  # fmt: skip
if cuda_mlp:
    # CUDA bounds the MLP's hidden bytes, which at width ``dim`` are dim/1536 of UNI2-h's: the chunk UNI2-h gets
    enc._mlp_chunk_tokens = lambda blk, x: HiResEncoder._mlp_chunk_tokens(enc, blk, x, cuda=True) * dim // 1536
x = torch.rand(1, 3, size, size, dtype=torch.bfloat16)
with torch.inference_mode():
    enc(x)  # compiles
    with torch.profiler.profile(profile_memory=True, activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        enc(x)
live = peak = 0
for event in sorted(prof.events(), key=lambda e: e.time_range.start):
    # frees outside an op are "[memory]" events; an op's own allocations and frees are its self usage
    live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
    peak = max(peak, live)
tokens = (size // 14) ** 2 + enc.num_prefix_tokens
unit = tokens * dim * 2
print(f"{backend}, {size} px, width {dim}, MLP chunked as on {'CUDA' if cuda_mlp else 'CPU'}: peak {peak / 1e6:.0f} MB over the weights = {peak / unit:.1f} × tokens × dim "
      f"(the input image is {x.numel() * 2 / unit:.1f} of them)")  # fmt: skip
