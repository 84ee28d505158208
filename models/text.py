"""Free text for the model families: a stateless hashing tokeniser and two text classifiers.

Tokenisation (:class:`HashingTokenizer`) keeps a hospital's words at the hospital: there is no
vocabulary and no fit step. A token is a run of word characters (``\\w+`` after Unicode NFKC
normalisation), lower-cased when ``lowercase``; its id is ``1 + (h mod buckets)`` where ``h`` is
the first 8 bytes (little endian) of BLAKE2b of the token's UTF-8 bytes, salted with nothing. The
same text gives the same ids on every run, process and machine (Python's own ``hash()`` is salted
per process and is never used). Id 0 is padding. Texts longer than ``max_length`` tokens are cut
to their first ``max_length`` tokens; each text comes with its length (the mask: position ``t``
is a token iff ``t < length``).

A vocabulary built from one hospital's text would list its rare words, which are names,
addresses and identifiers; hashed buckets are the same at every site and reveal nothing by
themselves. What a model's *update* reveals is another matter: without DP, a plain SGD step
changes only the embedding rows of buckets that occur in the batch, and the hash is public, so
whoever sees an update can test a dictionary of names against the changed rows. DP-SGD adds
Gaussian noise to every row (docs/privacy.md), which is what hides the set of buckets used.

Every example also carries the tokeniser's :attr:`HashingTokenizer.tag` (one int64 per example),
and the text models refuse ids made with another tokeniser (other buckets, length or casing):
a study's :class:`~fedcare.models.ModelSpec` records the tokeniser's settings, and a site whose
manifest tokenises differently is told which settings to change instead of being scored on
ids that mean something else.

Models
------
:class:`TextLSTM` (family ``text_lstm``): embedding -> :class:`~fedcare.models.ClinicalLSTM`
(Opacus ``DPLSTM``, read at each text's last token) -> class. :class:`TextBagOfEmbeddings`
(family ``text_bag``, the baseline): embedding -> mean over the text's tokens, times
sqrt(length) -> linear head.
Both are made of layers Opacus computes per-sample gradients for (``nn.Embedding``, ``DPLSTM``,
``nn.Linear``) and pass ``opacus.validators.ModuleValidator.validate(strict=True)``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .lstm import ClinicalLSTM

__all__ = [
    "MAX_BUCKETS",
    "MAX_TEXT_LENGTH",
    "TOKEN_PATTERN",
    "TOKENIZER_VERSION",
    "HashingTokenizer",
    "TextBagOfEmbeddings",
    "TextLSTM",
    "TokenizerMismatchError",
    "encode_texts",
]

TOKENIZER_VERSION = 1
"""Bumped whenever the token rule or the hash changes (it is part of :attr:`HashingTokenizer.tag`)."""

TOKEN_PATTERN = re.compile(r"\w+")
"""A token: a maximal run of Unicode word characters (letters, digits, underscore)."""

MAX_BUCKETS = 2**24 - 1
"""Largest ``buckets`` (the tag packs it in 24 bits)."""

MAX_TEXT_LENGTH = 2**20
"""Largest ``max_length`` (the tag packs it in 21 bits)."""


EMBEDDING_INIT_STD = 0.1
"""Standard deviation of the embeddings' initial values (torch's default N(0, 1) is far too
large for a mean of a few hundred tokens: the initial text vectors would be noise)."""


class TokenizerMismatchError(ValueError):
    """Token ids were made by a tokeniser other than the one the model was built for."""


class HashingTokenizer(BaseModel):
    """The hashing tokeniser: settings only, no state, no vocabulary, nothing learnt from data.

    Attributes
    ----------
    buckets : int
        Hash buckets; token ids are ``1..buckets`` and 0 is padding (an embedding of
        ``buckets + 1`` rows).
    max_length : int
        Tokens kept per text (the first ones); every text is padded to this length.
    lowercase : bool
        Lower-case the text before hashing (``"Aspirin"`` and ``"aspirin"`` share an id).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    buckets: int = Field(default=4096, ge=2, le=MAX_BUCKETS)
    max_length: int = Field(default=256, ge=1, le=MAX_TEXT_LENGTH)
    lowercase: bool = True

    @property
    def tag(self) -> int:
        """Return the settings packed into one int64 (version, casing, length, buckets).

        Reversible (:meth:`from_tag`), so a mismatch can say which settings differ.
        """
        return (
            (TOKENIZER_VERSION << 46)
            | (int(self.lowercase) << 45)
            | (self.max_length << 24)
            | self.buckets
        )

    @classmethod
    def from_tag(cls, tag: int) -> HashingTokenizer | None:
        """Return the tokeniser a tag describes, or None when it is not one of this version."""
        tag = int(tag)
        if tag < 0 or tag >> 46 != TOKENIZER_VERSION:
            return None
        try:
            return cls(
                buckets=tag & (2**24 - 1),
                max_length=(tag >> 24) & (2**21 - 1),
                lowercase=bool((tag >> 45) & 1),
            )
        except ValueError:
            return None

    def describe(self) -> str:
        """Return the settings as a manifest / scenario would write them."""
        return (
            f"buckets = {self.buckets}, max_length = {self.max_length}, "
            f"lowercase = {str(self.lowercase).lower()}"
        )

    def tokens(self, text: str) -> list[str]:
        """Return the tokens of ``text`` (normalised, lower-cased when set), not truncated."""
        text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        return TOKEN_PATTERN.findall(text)

    def token_id(self, token: str) -> int:
        """Return the id (1..buckets) of one token: 1 + BLAKE2b-64(token) mod buckets."""
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        return 1 + int.from_bytes(digest, "little") % self.buckets

    def encode(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ids, lengths)``: int64 ``(N, max_length)`` padded with 0, and int64 ``(N,)``."""
        rows: list[list[int]] = []
        cache: dict[str, int] = {}
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"the tokeniser reads str, got {type(text).__name__}")
            ids = []
            for token in self.tokens(text)[: self.max_length]:
                value = cache.get(token)
                if value is None:
                    value = cache[token] = self.token_id(token)
                ids.append(value)
            rows.append(ids)
        out = np.zeros((len(rows), self.max_length), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids
            lengths[i] = len(ids)
        return out, lengths

    def tags(self, n: int) -> np.ndarray:
        """Return ``n`` copies of :attr:`tag` (int64), the third input of the text models."""
        return np.full(n, self.tag, dtype=np.int64)


def _check_inputs(
    ids: torch.Tensor, lengths: torch.Tensor | None, tag: torch.Tensor | None,
    tokenizer: HashingTokenizer,
) -> torch.Tensor:
    """Check ids, lengths and the tokeniser tag against the model's; return the lengths."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"text models read integer token ids shaped (N, max_length), got {tuple(ids.shape)} "
            f"{ids.dtype}; tokenise with fedcare.models.text.HashingTokenizer"
        )
    if tag is not None and tag.numel() and bool((tag != tokenizer.tag).any()):
        other = HashingTokenizer.from_tag(int(tag[tag != tokenizer.tag][0]))
        made = other.describe() if other is not None else "an unknown tokeniser"
        raise TokenizerMismatchError(
            f"these token ids were made with {made}, but the model was built for "
            f"{tokenizer.describe()}; set the same values in the site manifest's [data] table "
            "(or the study's [model] table) so that both tokenise alike"
        )
    if ids.shape[1] != tokenizer.max_length:
        raise TokenizerMismatchError(
            f"texts are {ids.shape[1]} tokens long, the model expects max_length = "
            f"{tokenizer.max_length}; set max_length in the site manifest's [data] table to match"
        )
    if lengths is None:
        return (ids != 0).sum(dim=1)
    return lengths


class TextBagOfEmbeddings(nn.Module):
    """Bag of embeddings: the mean of a text's token embeddings (times sqrt(length)), then a linear head.

    Parameters
    ----------
    num_classes : int
        Classes; 2 gives one logit.
    embedding_dim : int
        Size of every token embedding.
    tokenizer : HashingTokenizer
        The tokenisation the ids come from (its ``buckets`` sizes the embedding).
    """

    def __init__(
        self,
        num_classes: int = 2,
        embedding_dim: int = 64,
        tokenizer: HashingTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer or HashingTokenizer()
        if num_classes < 2 or embedding_dim < 1:
            raise ValueError("text models classify: num_classes >= 2 and embedding_dim >= 1")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(self.tokenizer.buckets + 1, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_INIT_STD)
        self.head = nn.Linear(embedding_dim, 1 if num_classes == 2 else num_classes)

    def forward(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        tag: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits for token ids (N, max_length) with their lengths and tokeniser tags."""
        lengths = _check_inputs(ids, lengths, tag, self.tokenizer)
        steps = torch.arange(ids.shape[1], device=ids.device)
        mask = (steps.unsqueeze(0) < lengths.to(ids.device).unsqueeze(1)).to(torch.float32)
        emb = self.embedding(ids)  # (N, T, D)
        # the mean over the text's tokens, times sqrt(length): sum / sqrt(length). A plain mean
        # divides every token's gradient by the text's length (about 1/180 for an abstract), so
        # SGD barely moves the embeddings; sqrt(length) keeps the output's scale independent of
        # the length for random embeddings and the gradients 13x larger (measured: plain mean,
        # SGD, 20 epochs on Medical Abstracts, macro-F1 0.31; sum / sqrt(length) 0.4-0.46)
        pooled = (emb * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0).sqrt()
        y = self.head(pooled)
        return y.squeeze(-1) if self.num_classes == 2 else y


class TextLSTM(nn.Module):
    """Embedding, then :class:`ClinicalLSTM` (Opacus ``DPLSTM``) read at each text's last token.

    Parameters
    ----------
    num_classes : int
        Classes; 2 gives one logit.
    embedding_dim : int
        Size of every token embedding (the LSTM's input size).
    hidden_size, num_layers, bidirectional :
        As for :class:`ClinicalLSTM`.
    tokenizer : HashingTokenizer
        The tokenisation the ids come from (its ``buckets`` sizes the embedding).
    """

    def __init__(
        self,
        num_classes: int = 2,
        embedding_dim: int = 64,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        tokenizer: HashingTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer or HashingTokenizer()
        if num_classes < 2 or embedding_dim < 1:
            raise ValueError("text models classify: num_classes >= 2 and embedding_dim >= 1")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(self.tokenizer.buckets + 1, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_INIT_STD)
        self.encoder = ClinicalLSTM(
            embedding_dim, num_classes, hidden_size=hidden_size, num_layers=num_layers,
            bidirectional=bidirectional,
        )

    def forward(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        tag: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits for token ids (N, max_length) with their lengths and tokeniser tags."""
        lengths = _check_inputs(ids, lengths, tag, self.tokenizer)
        return self.encoder(self.embedding(ids), lengths.clamp(min=1))


def encode_texts(tokenizer: HashingTokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Return the text models' inputs ``(ids, lengths, tags)`` for ``texts`` as tensors."""
    ids, lengths = tokenizer.encode(texts)
    return (torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(tokenizer.tags(len(texts))))
