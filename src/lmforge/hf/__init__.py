"""Hugging Face model folders in and out: BERT, GPT-2 and the Llama family (Llama, Mistral without a
sliding window, Qwen2 with its q/k/v biases, Qwen3 with its q/k norms), as `save_pretrained` writes them and `from_pretrained` reads them.

  arch.py       each architecture described once, as data that import and export both read (an `Arch`)
  keymap.py     the pure key and tensor maps both ways (lmforge names <-> HF names, fused <-> split),
                and the map of a LoRA adapter to the peft library's keys
  tokenizer.py  rebuilding a `tokenizers` tokenizer from a folder, and the special-token roles HF names
  load.py       `load_hf(folder, build)`: the lmforge model in memory, built by the caller's builder
                (with base_dtype int8 / nf4: built on the meta device and streamed in, block weights quantised)
  export.py     `import_hf` (a folder -> a run directory), `export_hf` (a run -> a folder transformers
                and peft load), `write_peft_adapter`

The package's own __init__ imports nothing, so that reading the tables does not load the exporter
(which sits above the run loader in the layers, docs/architecture.md).
"""
