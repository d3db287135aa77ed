"""The shared formats: feature encoding, grown vocabularies, artifacts and adapter packages,
safetensors checks and the ONNX export; read by training and the service alike."""
