"""Encode-only (bare forward on pre-decoded pixels) vs decode+encode through indexer.build._batches
(parallel decode) and _batches_serial, learned encoder demo/model, on a manifest."""
import sys, time, json
import indexer.build as build
from indexer.manifest import read_manifest
from retrieval.encoders import create_encoder

manifest = sys.argv[1]
studies = list(read_manifest(manifest))
enc = create_encoder("medrag-native", checkpoint="demo/model", device="cpu")
conds = [None] + [a for a in ("lung", "left lung", "right lung", "heart", "pleura") if enc.supports_anatomy(a)]
def encode(imgs):
    if hasattr(enc, "encode_conditions"):
        enc.encode_conditions(imgs, conds)
    else:
        for a in conds: enc.encode_images(imgs, anatomy=a)
skip = lambda s, m: None
t = time.perf_counter(); batches = [[p[2] for p in b] for b in build._batches_serial(studies, manifest, 16, skip)]; decode_s = time.perf_counter() - t
n = sum(len(b) for b in batches)
encode(batches[0])  # warm-up
t = time.perf_counter()
for b in batches: encode(b)
enc_s = time.perf_counter() - t
del batches
res = {"images": n, "decode_serial_s": round(decode_s, 1), "encode_only_s": round(enc_s, 1)}
for name, fn in (("full_parallel_decode", build._batches), ("full_serial_decode", build._batches_serial)):
    t = time.perf_counter()
    for b in fn(studies, manifest, 16, skip): encode([p[2] for p in b])
    res[name + "_s"] = round(time.perf_counter() - t, 1)
res["ratio_parallel"] = round(res["full_parallel_decode_s"] / enc_s, 2)
res["ratio_serial"] = round(res["full_serial_decode_s"] / enc_s, 2)
print(json.dumps(res), flush=True)
