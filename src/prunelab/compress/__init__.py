"""Deep Compression storage: weight sharing, relative sparse indices, Huffman coding, one file.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", ICLR 2016.  The pipeline after pruning::

    codebooks = quantize_model(model, masks, bits={"fc": 5})            # k-means, linear init
    codebooks = finetune_centroids(model, codebooks, train_loader, 2, 0.01)
    report = write_compressed("model.plc", model, masks, bits={"fc": 5}, index_bits={"fc": 5})
    state = read_compressed("model.plc")                                   # exactly the quantised weights
"""

from prunelab.compress.container import (
    FORMAT_VERSION, MAGIC, REPORT_COLUMNS, CompressionReport, LayerReport, read_compressed, write_compressed,
)
from prunelab.compress.huffman import canonical_codes, code_lengths
from prunelab.compress.quantize import (
    CentroidSGD, Codebook, finetune_centroids, kmeans_1d, quantize_model, quantize_weight,
)
from prunelab.compress.sparse_index import RelativeIndex, relative_decode, relative_encode

__all__ = [
    "FORMAT_VERSION", "MAGIC", "REPORT_COLUMNS", "CentroidSGD", "Codebook", "CompressionReport", "LayerReport",
    "RelativeIndex", "canonical_codes", "code_lengths", "finetune_centroids", "kmeans_1d", "quantize_model",
    "quantize_weight", "read_compressed", "relative_decode", "relative_encode", "write_compressed",
]
