"""Write the first N PNGs of a folder as 12-bit DICOM CR files (the build benchmark's DICOM set): python scripts/bench/make_dicom_crs.py PNG_DIR OUT_DIR N"""
import sys, json
from pathlib import Path
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid, SecondaryCaptureImageStorage
src = Path(sys.argv[1]); out = Path(sys.argv[2]); n = int(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
lines = []
for i, png in enumerate(sorted(src.glob("*.png"))[:n]):
    a = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16  # 12-bit, like a CR
    meta = FileMetaDataset(); meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"; meta.MediaStorageSOPInstanceUID = generate_uid(); meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out / f"{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID; ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"; ds.PatientID = f"P{i}"; ds.StudyInstanceUID = generate_uid(); ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = a.shape; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16; ds.BitsStored = 12; ds.HighBit = 11; ds.PixelRepresentation = 0
    ds.PixelData = a.tobytes()
    ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
    lines.append(json.dumps({"study_id": f"d{i}", "patient_id": f"P{i}", "modality": "CR", "images": [f"{i}.dcm"], "report": None}))
(out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
print(len(lines))
