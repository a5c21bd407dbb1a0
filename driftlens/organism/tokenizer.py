"""Offline tokenizers for tiny test models and the model organism.

Nothing here downloads: a byte-level BPE is trained with the ``tokenizers`` library on a
small corpus (English and Korean by default), so every byte -- Hangul included -- is
representable, and wrapped as a ``transformers.PreTrainedTokenizerFast`` that saves and
loads like any hub tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

DEFAULT_CORPUS = (
    "a red circle on the left. a blue square on the right. a green triangle in the middle.",
    "what color is the shape? what shape is it? where is the shape? answer: red blue green",
    "왼쪽에 빨간 원이 있다. 오른쪽에 파란 사각형이 있다. 가운데에 초록 삼각형이 있다.",
    "도형은 무슨 색인가요? 어떤 도형인가요? 도형은 어디에 있나요? 답: 빨간색 파란색 초록색",
    "The quick brown fox jumps over the lazy dog. 다람쥐 헌 쳇바퀴에 타고파.",
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
    extra_special_tokens: Sequence[str] = ("<image>",),
):
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    Parameters
    ----------
    corpus : iterable of str, optional
        Training text; defaults to a small English/Korean corpus.
    vocab_size : int
        Target vocabulary size including the 256 byte symbols and special tokens.
    extra_special_tokens : sequence of str
        Added as special tokens (never split), e.g. image placeholders. Their ids follow
        the four base specials ``<pad> <s> </s> <unk>`` (ids 0-3) in the order given.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``pad_token="<pad>"``, ``bos_token="<s>"``, ``eos_token="</s>"``, ``unk_token="<unk>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else DEFAULT_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    extra = [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast
