// Reads a probability OME-TIFF the way QuPath does (Bio-Formats, resolutions not flattened) and prints what it sees:
// the reader, the channels' names and colours, the pixel size, and a CRC-32 of every plane at every resolution.
// Used by check_probs_tiff_bioformats.sh, which compares the CRCs with the arrays hirespath wrote.
import java.util.zip.CRC32;
import loci.common.services.ServiceFactory;
import loci.formats.ImageReader;
import loci.formats.meta.IMetadata;
import loci.formats.services.OMEXMLService;

public class CheckProbsTiff {
    public static void main(String[] args) throws Exception {
        loci.common.DebugTools.setRootLevel("WARN");  // its DEBUG lines go to stdout otherwise
        IMetadata meta = new ServiceFactory().getInstance(OMEXMLService.class).createOMEXMLMetadata();
        ImageReader reader = new ImageReader();
        reader.setFlattenedResolutions(false);
        reader.setMetadataStore(meta);
        reader.setId(args[0]);
        System.out.println("reader " + reader.getReader().getClass().getSimpleName());
        System.out.println("series " + reader.getSeriesCount() + " resolutions " + reader.getResolutionCount()
                + " channels " + reader.getSizeC() + " rgb " + reader.isRGB());
        System.out.println("pixel_size " + meta.getPixelsPhysicalSizeX(0).value() + " "
                + meta.getPixelsPhysicalSizeX(0).unit().getSymbol());
        for (int c = 0; c < reader.getSizeC(); c++) {
            int rgba = meta.getChannelColor(0, c).getValue();
            System.out.println("channel " + c + " " + meta.getChannelName(0, c) + " " + ((rgba >> 24) & 255) + ","
                    + ((rgba >> 16) & 255) + "," + ((rgba >> 8) & 255));
        }
        for (int r = 0; r < reader.getResolutionCount(); r++) {
            reader.setResolution(r);
            for (int c = 0; c < reader.getSizeC(); c++) {
                CRC32 crc = new CRC32();
                crc.update(reader.openBytes(reader.getIndex(0, c, 0)));
                System.out.println("plane " + r + " " + c + " " + reader.getSizeX() + "x" + reader.getSizeY() + " "
                        + crc.getValue());
            }
        }
        reader.close();
    }
}
