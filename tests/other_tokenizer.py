"""A tokenizer that is not Qwen3's, built offline: SentencePiece-style (Metaspace word starts,
byte fallback, like Llama and Mistral), a small BPE vocabulary trained on the demo corpus, with a
ChatML chat template. The upstream model that uses it forces the guard onto the text path."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from guard.demo.corpus import SAFE_PROMPTS, SAFE_SENTENCES, UNSAFE_PROMPTS, UNSAFE_SENTENCES

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_other_tokenizer(out_dir: Path, vocab_size: int = 640):
    """Train and save (tokenizer.json + config, loadable by AutoTokenizer); returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, *byte_tokens], show_progress=False)
    corpus = [*SAFE_PROMPTS, *SAFE_SENTENCES, *(p for p, _ in UNSAFE_PROMPTS), *(s for s, _, _ in UNSAFE_SENTENCES)]
    tokenizer.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf
