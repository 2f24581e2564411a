"""Turning pixels and tokens into vectors: the room below training, evaluation, indexing and search.

- :mod:`.loader`    decoding images for batches (the DataLoader side)
- :mod:`.cache`     the on-disk feature cache of frozen towers, and the default cache root
- :mod:`.runtime`   ONNX Runtime sessions, records of verified exports (torch-free)
- :mod:`.pipeline`  decode + embed in lanes with ONNX Runtime alone (torch-free indexing)
- :mod:`.quantize`  INT8 copies of ONNX encoders (static QDQ for images, dynamic for text)
- :mod:`.modules`   tower + head + L2 norm as one module (what an index stores, what queries use)
- :mod:`.backends`  inference backends (torch, ONNX Runtime, verified against torch)
- :mod:`.export`    ONNX export of image and text encoders, and the export folder
- :mod:`.onnx`      encoders run from an export folder with ONNX Runtime alone (torch-free)
- :mod:`.features`  tower features and embeddings of records, through the cache
"""
