"""Write the text-only `Llama4ForCausalLM` layout of a Llama 4 checkpoint (what vLLM's CPU build
loads for a text model): config.json = the checkpoint's `text_config` with that architecture,
tensors `language_model.model.*` -> `model.*` and `language_model.lm_head.*` -> `lm_head.*`,
the vision tower dropped, tokenizer and generation files copied. Same weights, same dtype.

    python bench/causal_lm_checkpoint.py checkpoints/small-scout /tmp/small-scout-text
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def convert(src: Path, dst: Path) -> Path:
    """Write the text-only layout of `src` into `dst`; returns `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    text = dict(config["text_config"], architectures=["Llama4ForCausalLM"], model_type="llama4_text")
    text.setdefault("torch_dtype", config.get("torch_dtype", "float32"))
    (dst / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.startswith("language_model."):
                    tensors[name.removeprefix("language_model.")] = f.get_tensor(name)
    if not tensors:
        raise SystemExit(f"{src} has no language_model.* tensors")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    print(convert(args.src, args.dst))


if __name__ == "__main__":
    main()
