# Embed two photos with an exported model: onnxruntime, PIL and numpy only (python export.py).
# Usage: python onnx_example.py model.onnx photo1.jpg photo2.jpg
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map  # preprocessing travels with the model
r, s = int(meta["resize_size"]), int(meta["crop_size"])
mean, std = (np.array(json.loads(meta[k]), np.float32) for k in ("mean", "std"))

def embed(path):  # square resize to r x r, center crop s x s, normalise, NCHW
    image = Image.open(path)
    image.draft("RGB", (r, r))  # JPEG: decode at reduced scale when >= r (as training did)
    image = ImageOps.exif_transpose(image).convert("RGB").resize((r, r), Image.BILINEAR)
    c = int(round((r - s) / 2))
    x = (np.asarray(image, np.float32)[c:c + s, c:c + s] / 255 - mean) / std
    return session.run(["embeddings"], {"images": x.transpose(2, 0, 1)[None]})[0][0]

print("cosine similarity:", float(embed(sys.argv[2]) @ embed(sys.argv[3])))  # unit vectors
