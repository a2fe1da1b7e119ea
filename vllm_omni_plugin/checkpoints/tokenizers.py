"""Small deterministic tokenizers in the real models' formats, built locally.

No hub is reachable, so the tokenizers of the real checkpoints cannot be
copied. These have the same *class*, pre-tokenization, special tokens and chat
template as the real ones, with a vocabulary of a few hundred tokens learnt
from a fixed built-in corpus (BPE training in `tokenizers` is deterministic;
its unigram trainer is not, so the unigram vocabulary is counted by hand).

Model configs use `QWEN2_MODEL_VOCAB` / `T5_MODEL_VOCAB` / `GLM_MODEL_VOCAB`
(>= len(tokenizer), like the real models whose embedding tables are padded
past the tokenizer) and look special token ids up on the returned tokenizer.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Text the vocabularies are learnt from. It contains the prompt templates the
# diffusers pipelines prepend, so that (as with the real Qwen tokenizer) their
# words are single tokens and the template prefixes have the token counts the
# pipelines hard-code (`prompt_template_encode_start_idx` 34 and 64).
CORPUS = """\
system user assistant
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:
Describe the key features of the input image (color, shape, size, texture, objects, background), then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while maintaining consistency with the original input where appropriate.
You are a helpful assistant. You are a professional image annotator. Please write an image caption based on the input image.
A red cat sitting on a blue chair in the sun. A dog running on the beach at sunset, waves in the background.
A photo of a mountain lake with snow, trees and a small wooden house. An astronaut riding a horse on the moon.
Make the sky purple. Replace the car with a bicycle. Add a hat to the man. Remove the text from the sign.
A bowl of fruit on a white table: apples, oranges, bananas and grapes. The city at night with neon lights and rain.
The quick brown fox jumps over the lazy dog. Two people walking in a park, green grass, bright light, high quality.
Draw a poster with the words "Hello World" in large letters, 4k, detailed, realistic, cinematic, soft light.
"""
# Repeated so that the template words win the BPE merges over the captions.
_TEMPLATE_WEIGHT = 40

# ---------------------------------------------------------------------- Qwen2

# Qwen2 / Qwen2.5-VL special tokens in the real tokenizer's order (ids 151643...).
QWEN2_SPECIAL_TOKENS = (
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
)
QWEN2_BPE_VOCAB = 640  # learnt tokens (256 bytes + merges), before the special tokens
QWEN2_MODEL_VOCAB = 768  # embedding rows for models using this tokenizer; >= len(tokenizer)

# Qwen2-VL-style chat template: string or [{type: text|image|video}] content,
# a default system turn, <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _qwen2_pre_tokenizer():
    """Qwen2's pre-tokenizer (regex split + byte level), taken from a throw-away Qwen2Tokenizer."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer()._tokenizer.pre_tokenizer


def _byte_level_bpe(vocab_size: int, pre_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level BPE (vocab, merges) from CORPUS; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines[:3] * _TEMPLATE_WEIGHT + lines, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def write_qwen2_tokenizer(out: Path, *, extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """Write a Qwen2Tokenizer (tokenizer.json + tokenizer_config.json with the chat template) into `out`.

    Special tokens follow the learnt vocabulary, in the real order, then
    `extra_special_tokens`. Returns the tokenizer as `AutoTokenizer` loads it back.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(QWEN2_BPE_VOCAB, _qwen2_pre_tokenizer())
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        model_max_length=32768,
        chat_template=QWEN2_CHAT_TEMPLATE,
    )
    specials = list(QWEN2_SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in QWEN2_SPECIAL_TOKENS]
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.eos_token = "<|im_end|>"  # as in Qwen2.5-VL-7B-Instruct (pad and unk stay <|endoftext|>)
    return _save_and_reload(tok, out, QWEN2_MODEL_VOCAB)


def _save_and_reload(tok: PreTrainedTokenizerBase, out: Path, model_vocab: int) -> PreTrainedTokenizerBase:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    if len(loaded) > model_vocab:
        raise AssertionError(f"tokenizer has {len(loaded)} tokens > model vocab {model_vocab}")
    return loaded


# ------------------------------------------------------------------ T5 / UMT5

T5_EXTRA_IDS = 100  # sentinels <extra_id_N>, the last vocab entries (reversed), as in T5/UMT5
T5_MODEL_VOCAB = 512


def _unigram_pieces() -> list[tuple[str, float]]:
    """SentencePiece-style pieces with log-frequency scores, counted (not trained) from CORPUS.

    Pieces: whole words with the "▁" word-start marker, plus every single
    character (with and without "▁") so that any text of those characters
    segments without <unk>.
    """
    words = Counter("▁" + w for w in CORPUS.split())
    chars = Counter(c for w in words.elements() for c in w)
    chars.update("▁" + c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    counts = chars + Counter({w: n for w, n in words.items() if len(w) > 2})
    total = sum(counts.values())
    # Sorted by (-count, piece): a stable order independent of hashing.
    return [(p, math.log(n / total)) for p, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def write_t5_tokenizer(out: Path) -> PreTrainedTokenizerBase:
    """Write a T5Tokenizer (unigram, as google/umt5-xxl's tokenizer.json) into `out`.

    Layout of the real one: <pad>=0, </s>=1, <unk>=2, pieces, then the
    sentinels <extra_id_{N-1}> ... <extra_id_0> at the end.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _unigram_pieces()
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tok = T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=512)
    return _save_and_reload(tok, out, T5_MODEL_VOCAB)


# ------------------------------------------------------------------ GLM-Image

# GLM-4 special tokens in the real order (GLM-4 ids 151329...; in GLM-Image
# shifted by the vision vocabulary: <|endoftext|> 167841, <sop> 167845,
# <|image|> 167855, as in zai-org/GLM-Image's vision_language_encoder config).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)
GLM_VISION_SPECIALS = 128  # <|dit_token_{codebook}|>... after the codes: image start (bos), image end (eos), spare
GLM_BPE_VOCAB = 512

# GLM-Image's AR prompt is the bare text (no role markers); a source image is
# <image start><|image|><image end>, the markers get_rope_index looks for.
GLM_IMAGE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- bos_token + '<|image|>' + eos_token -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def glm_image_vocab_size(codebook_size: int) -> int:
    """len() of the GLM-Image tokenizer for a VQ codebook of `codebook_size` (the AR model's vocab_size floor)."""
    return codebook_size + GLM_VISION_SPECIALS + GLM_BPE_VOCAB + len(GLM_SPECIAL_TOKENS)


def write_glm_image_tokenizer(out: Path, *, codebook_size: int) -> PreTrainedTokenizerBase:
    """Write GLM-Image's AR tokenizer (processor/ tokenizer files) into `out`.

    Layout of the real one: ids [0, codebook + 128) are the vision tokens
    <|dit_token_i|> (codes, then bos = image start = <|dit_token_{codebook}|>,
    eos = image end = the next one), then the text BPE, then the GLM-4
    special tokens. <|image|>, <sop>, <eop> are the processor's image and grid
    tokens.
    """
    from transformers import PreTrainedTokenizerFast

    n_vision = codebook_size + GLM_VISION_SPECIALS
    vision = [f"<|dit_token_{i}|>" for i in range(n_vision)]
    bpe_vocab, merges = _byte_level_bpe(GLM_BPE_VOCAB, _qwen2_pre_tokenizer())
    vocab = {tok: i for i, tok in enumerate(vision)}
    vocab.update({tok: n_vision + i for tok, i in bpe_vocab.items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = _qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    bos, eos = vision[codebook_size], vision[codebook_size + 1]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        image_token="<|image|>",
        grid_bos_token="<sop>",
        grid_eos_token="<eop>",
        chat_template=GLM_IMAGE_CHAT_TEMPLATE,
        model_max_length=131072,
    )
    tok.add_special_tokens({"additional_special_tokens": vision + list(GLM_SPECIAL_TOKENS)})
    return _save_and_reload(tok, out, glm_image_vocab_size(codebook_size))
