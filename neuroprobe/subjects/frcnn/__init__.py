"""The bottom-up-attention Faster R-CNN that gives LXMERT its region features, in plain torch.

Public API::

    detector = load_detector(weights=None | DIR, device="cpu", init="pretrained" | "random")
    regions = extract_regions(detector, images, n_regions=36)   # dict of tensors
    regions["features"]  # [B, 36, 2048];  regions["boxes"]  # [B, 36, 4] normalised x1, y1, x2, y2

Modules: :mod:`.config` (``FrcnnConfig``), :mod:`.ops` (NMS, RoIPool, box coder),
:mod:`.preprocess` (resize/normalise/pad), :mod:`.model` (``Detector``),
:mod:`.extract` (post-processing), :mod:`.loading` (folder / hub).
"""
from neuroprobe.subjects.frcnn.config import FrcnnConfig
from neuroprobe.subjects.frcnn.extract import extract_regions
from neuroprobe.subjects.frcnn.loading import DEFAULT_HUB_ID, load_detector, save_detector
from neuroprobe.subjects.frcnn.model import Detector, DetectorOutput
from neuroprobe.subjects.frcnn.preprocess import PreprocessedImages, preprocess_images

__all__ = ["DEFAULT_HUB_ID", "Detector", "DetectorOutput", "FrcnnConfig", "PreprocessedImages",
           "extract_regions", "load_detector", "preprocess_images", "save_detector"]
