"""What the scripts that run the official X-VLM code (zengyan-97/X-VLM @ cb4fff1) offline share: the import
stubs for the modules it imports but never uses here, the fixtures' splitmix64 byte generator, and the
intended (wrap-free) AutoContrast and Sharpness of xvlm's `exact_ops: True`.

Only the standard library is imported at module level: scripts/pil-resize-cases.py runs in a venv that
has Pillow and nothing else.
"""
import importlib
import sys
import types

MASK = (1 << 64) - 1

# The caption-metric, COCO and REFER modules the official `dataset` package imports at module level, each
# with the one name imported from it.
UNUSED_IMPORTS = [
    ("vqaTools.vqaEval", "VQAEval"),
    ("refTools.evaluation.refEvaluation", "RefEvaluation"),
    ("refTools.refer_python3", "REFER"),
    ("pycocotools.coco", "COCO"),
    ("pycocoevalcap.eval", "COCOEvalCap"),
]


class Unused:
    """Stands for a class that is imported and never used."""


def empty_module(name, **attrs):
    """Registers a module `name` holding `attrs`."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def namespace(name, path):
    """A package whose __init__ is not run (its heavy imports are not needed here)."""
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def stub_unused_imports(extra=()):
    """Empty modules for UNUSED_IMPORTS and `extra` ((module, name) pairs), parents included."""
    for name, attr in [*UNUSED_IMPORTS, *extra]:
        parent = name.rsplit(".", 1)[0]
        if parent not in sys.modules:
            empty_module(parent).__path__ = []
        empty_module(name, **{attr: Unused})


def import_transformers_tokenizers():
    """Imports transformers' tokenizer registry with a `tokenizers` stub in place, then removes it.

    transformers 4.12.5 is installed without its `tokenizers<0.11` (no Python 3.11 wheel) and imports a
    few of its names when a slow tokenizer loads; none is used. Its own "is it installed" check keeps
    answering no after the stub is gone.
    """
    importlib.import_module("transformers.file_utils").is_tokenizers_available = lambda: False
    stub = empty_module("tokenizers", Encoding=Unused, Tokenizer=Unused, Regex=Unused)
    stub.__path__ = []
    for sub in ["decoders", "normalizers", "pre_tokenizers", "processors"]:
        setattr(stub, sub, empty_module(f"tokenizers.{sub}", Decoder=Unused))
    empty_module("tokenizers.trainers", BpeTrainer=Unused, UnigramTrainer=Unused,
                 WordLevelTrainer=Unused, WordPieceTrainer=Unused)
    empty_module("tokenizers.models", BPE=Unused, Unigram=Unused, WordPiece=Unused)
    importlib.import_module("transformers.models.auto.tokenization_auto")
    for name in [n for n in sys.modules if n == "tokenizers" or n.startswith("tokenizers.")]:
        del sys.modules[name]


def splitmix64_bytes(seed: int, n: int) -> bytes:
    """`n` bytes of splitmix64 seeded with `seed`, 8 little-endian bytes per output (as the Rust tests)."""
    state = seed & MASK
    out = bytearray()
    while len(out) < n:
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        out += z.to_bytes(8, "little")
    return bytes(out[:n])


def autocontrast_intended(img):
    """AutoContrast as its authors meant it: each channel stretched to 0..255, no uint8 wrap of `-low`."""
    import numpy as np

    def channel(ch):
        high, low = int(ch.max()), int(ch.min())
        if high <= low:
            return ch
        table = (np.arange(256) - low) * (255 / (high - low))
        return table.clip(0, 255).astype(np.uint8)[ch]
    return np.stack([channel(img[:, :, c]) for c in range(img.shape[2])], axis=-1)


def sharpness_intended(img, factor):
    """Sharpness blended in float and clipped before the uint8 cast (the official casts unclipped)."""
    import cv2
    import numpy as np

    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1][1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel).astype(np.float32)[1:-1, 1:-1, :]
    out = img.astype(np.float32)
    out[1:-1, 1:-1, :] = degenerate + factor * (out[1:-1, 1:-1, :] - degenerate)
    return out.clip(0, 255).astype(np.uint8)


def build_without_weights(config):
    """`models.model_pretrain.XVLM(config)` with the two pretrained-weight loaders bypassed (no weights exist
    offline): `build_vision_encoder` runs with load_params=False and `BertForMaskedLM.from_pretrained`
    returns `cls(config)`, reporting the cross-attention keys missing. Needs the official checkout on
    sys.path and import_transformers_tokenizers() done."""
    import models.xvlm as X
    from models.model_pretrain import XVLM

    orig_bve = X.build_vision_encoder
    orig_fp = X.BertForMaskedLM.__dict__.get("from_pretrained")

    def from_pretrained(cls, name_or_path, *args, config=None, output_loading_info=False, **kwargs):
        model = cls(config)
        missing = [k for k, _ in model.named_parameters() if "crossattention" in k]
        info = {"missing_keys": missing, "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return (model, info) if output_loading_info else model

    X.build_vision_encoder = lambda cfg, load_params=False: orig_bve(cfg, load_params=False)
    X.BertForMaskedLM.from_pretrained = classmethod(from_pretrained)
    try:
        return XVLM(config=config)
    finally:
        X.build_vision_encoder = orig_bve
        if orig_fp is None:
            del X.BertForMaskedLM.from_pretrained
        else:
            X.BertForMaskedLM.from_pretrained = orig_fp
