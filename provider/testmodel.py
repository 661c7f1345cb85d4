"""A tiny Llama-architecture model with random weights, built locally: what tests and the demo serve.

It has a real byte-level BPE tokenizer, a chat template and safetensors weights in the layout vLLM loads
for ``LlamaForCausalLM``, so a batch runs through the real engine on a CPU in seconds. Its answers are
noise. No download is involved: the tokenizer is trained on a few fixed sentences and the weights drawn
from a seeded generator, so the same call makes the same bytes (and the same CID) every time.

    python -m provider.testmodel DIR      # writes the model into DIR and prints its path
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Final

HEAD_DIM: Final = 64  # vLLM's CPU attention supports 64 and up, not the 16 of the usual toy configs
HIDDEN: Final = 128
HEADS: Final = HIDDEN // HEAD_DIM
LAYERS: Final = 2
INTERMEDIATE: Final = 256
VOCAB: Final = 512
MAX_CONTEXT: Final = 2048
SPECIAL_TOKENS: Final = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE: Final = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS: Final = (
    "The quick brown fox jumps over the lazy dog.",
    "Hearth runs batch inference jobs in hardened containers and is paid from an escrow.",
    "Summarise this paragraph in one sentence, please.",
    "hello world",
)


def build_test_model(dest: Path, *, seed: int = 0) -> Path:
    """Write the model (config, tokenizer, chat template, weights) into ``dest`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from provider.catalog import transformers_module

    transformers = transformers_module()

    dest.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CORPUS) * 16, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(str(dest))
    vocab = bpe.get_vocab_size()
    transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=bpe.token_to_id("<s>"),
        eos_token_id=bpe.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
    ).save_pretrained(str(dest))
    _write_weights(dest / "model.safetensors", vocab, seed)
    for path in dest.iterdir():
        path.chmod(0o644)  # the sandbox user reads the weights through a read-only mount
    return dest


def _write_weights(path: Path, vocab: int, seed: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def w(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    attn = HEADS * HEAD_DIM
    tensors = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(attn, HIDDEN),
            p + "self_attn.k_proj.weight": w(attn, HIDDEN),
            p + "self_attn.v_proj.weight": w(attn, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, attn),
            p + "mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": ones(HIDDEN),
            p + "post_attention_layernorm.weight": ones(HIDDEN),
        }
    tensors["lm_head.weight"] = w(vocab, HIDDEN)
    save_file(tensors, str(path), metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m provider.testmodel DIR")
    print(build_test_model(Path(sys.argv[1])))
