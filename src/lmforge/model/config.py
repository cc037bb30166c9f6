"""ModelConfig and the named presets."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.fields import between, ge, gt, opt


@dataclass
class ModelConfig:
    """The defaults are the model `lmforge pretrain` trains with no config: a 4-layer, 256-wide GPT
    with RoPE, RMSNorm and SwiGLU (about 4M parameters at a 4096-token vocabulary), which is Llama's
    layout, so it exports to Hugging Face as it is. The same fields describe
    the encoder the mlm task trains (see the bert-* presets)."""

    preset: str | None = opt(None, "named preset supplying the defaults below (char-tiny, gpt-10m, gpt2-small, bert-tiny, bert-base; "
                               "encoder-decoders: bart-tiny, bart-base)")
    vocab_size: int = opt(0, "vocabulary size; 0 = take it from the tokenizer", check=ge(0))
    max_seq_len: int = opt(128, "context length in tokens", check=gt(0))
    n_layer: int = opt(4, "Transformer blocks", check=gt(0))
    n_head: int = opt(4, "attention heads", check=gt(0))
    n_kv_head: int = opt(0, "key/value heads (grouped-query attention); 0 = n_head", check=ge(0))
    head_dim: int = opt(0, "size of each attention head; 0 = d_model / n_head (Qwen3 and Gemma checkpoints set another)",
                        check=ge(0))
    d_model: int = opt(256, "model width", check=gt(0))
    d_ff: int = opt(0, "MLP hidden width; 0 = 4*d_model (8/3*d_model rounded to 64 for swiglu)", check=ge(0))
    pos: str = opt("rope", "position encoding", choices=("learned", "rope"))
    rope_theta: float = opt(10000.0, "RoPE base", check=gt(0))
    rope_scaling: str = opt("none", "RoPE frequency scaling for a longer context: none, or llama3 (Llama 3.1's, set by "
                            "the four rope_* fields below)", choices=("none", "llama3"))
    rope_factor: float = opt(8.0, "llama3 RoPE scaling: the long wavelengths are stretched this many times", check=gt(0))
    rope_low_freq_factor: float = opt(1.0, "llama3 RoPE scaling: wavelengths longer than rope_original_max_len / this "
                                      "are stretched", check=gt(0))
    rope_high_freq_factor: float = opt(4.0, "llama3 RoPE scaling: wavelengths shorter than rope_original_max_len / this "
                                       "are kept (those between are blended)", check=gt(0))
    rope_original_max_len: int = opt(8192, "llama3 RoPE scaling: the context the model was first trained for", check=gt(0))
    norm: str = opt("rmsnorm", "normalisation", choices=("layernorm", "rmsnorm"))
    norm_eps: float = opt(1e-5, "normalisation epsilon", check=gt(0))
    norm_position: str = opt("pre", "pre: a norm before each sublayer and one at the end (GPT-2, Llama); post: after each "
                             "residual add and on the embeddings, none at the end (BERT)", choices=("pre", "post"))
    type_vocab_size: int = opt(0, "segment embeddings (BERT's sentence A / B); 0 = none", check=ge(0))
    mlp: str = opt("swiglu", "MLP activation (gelu_tanh: the tanh approximation GPT-2 uses; swiglu: gated, as Llama)",
                   choices=("gelu", "gelu_tanh", "relu", "swiglu"))
    bias: bool = opt(False, "biases in linear layers and LayerNorm")
    qkv_bias: bool = opt(False, "biases on the attention's query, key and value projections even where model.bias is "
                         "false (Qwen2)")
    qk_norm: bool = opt(False, "an RMSNorm over each head's queries and keys before RoPE (Qwen3)")
    tie_embeddings: bool = opt(True, "share the token embedding with the output projection")
    dropout: float = opt(0.0, "dropout on embeddings, attention and residual branches", check=between(0, 0.99))
    init_std: float = opt(0.02, "std of the normal init of weights", check=gt(0))
    depth_scaled_init: bool = opt(True, "scale residual output projections by 1/sqrt(2*n_layer) (GPT-2)")

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0 and self.d_model % self.n_head == 0:  # otherwise left 0 for Config.validate to refuse
            self.head_dim = self.d_model // self.n_head
        if self.d_ff == 0:
            self.d_ff = 64 * round(8 * self.d_model / 3 / 64) if self.mlp == "swiglu" else 4 * self.d_model


# the fields only model.rope_scaling = llama3 reads
LLAMA3_ROPE_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")

# Each preset is a set of ModelConfig values; explicit keys in a config override them.
PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare_char CPU shape: ~0.8M parameters at a character vocabulary.
    "char-tiny": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=64),
    # ~10.6M parameters in the blocks (nanoGPT's shakespeare_char GPU shape).
    "gpt-10m": dict(n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    # GPT-2 small (124M at vocabulary 50257).
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50257, mlp="gelu_tanh",
                       pos="learned", norm="layernorm", bias=True, tie_embeddings=True),
    # BERT's layout (post-LN, learned positions, segments, exact GELU) at a size that trains on a CPU.
    "bert-tiny": dict(n_layer=4, n_head=4, d_model=256, max_seq_len=128, pos="learned", norm="layernorm",
                      norm_eps=1e-12, norm_position="post", mlp="gelu", bias=True, type_vocab_size=2,
                      depth_scaled_init=False),
    "bert-base": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=512, pos="learned", norm="layernorm",
                      norm_eps=1e-12, norm_position="post", mlp="gelu", bias=True, type_vocab_size=2,
                      depth_scaled_init=False),
    # BART's layout for an encoder-decoder (task seq2seq or span): post-LN, learned positions, embedding norm,
    # biases, exact GELU; `lmforge export` writes it as BartForConditionalGeneration (hf/bart.py). The tiny one
    # is the translate-multi30k recipe's shape, the base one facebook/bart-base's (6 + 6 layers). Post-LN wants
    # about half a pre-norm model's lr: the multi30k recipe's 2e-3 barely trains it, 1e-3 does (docs/translation.md).
    "bart-tiny": dict(n_layer=3, n_head=4, d_model=256, max_seq_len=128, pos="learned", norm="layernorm",
                      norm_eps=1e-5, norm_position="post", mlp="gelu", bias=True, depth_scaled_init=False),
    "bart-base": dict(n_layer=6, n_head=12, d_model=768, max_seq_len=1024, pos="learned", norm="layernorm",
                      norm_eps=1e-5, norm_position="post", mlp="gelu", bias=True, depth_scaled_init=False),
}
