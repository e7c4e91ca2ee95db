"""A student with a vocabulary of its own: the pruned teacher given a smaller BPE trained on the data.

    student: pruned:15+bpe:16384

builds (once, cached like the pruned student) the teacher depth-pruned to 15 layers
(:mod:`neobench.training.prune`) whose tokenizer is a byte-level BPE of 16,384 tokens trained
with the ``tokenizers`` library on the training split's chat-formatted conversations, and whose
embedding (tied to its output head) is built for it:

* the special tokens come first, in the teacher's order, so BOS/EOS/padding keep their ids;
* the pre-tokenizer is the teacher's (byte-level, GPT-2 split rules), so both vocabularies spell
  a token alike and many tokens are shared (``shared_vocab_kl`` compares over those);
* a token the teacher spells alike takes the teacher's embedding row; any other token is the mean
  of the teacher rows of the teacher tokens its bytes split into (the teacher's BPE model applied
  to the token's byte string), as in Fast Vocabulary Transfer (Gee et al., 2022). The card
  records how many tokens were shared.

For SmolLM2-135M the embedding shrinks from 49,152 x 576 (28.3M parameters) to 16,384 x 576 (9.4M).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from neobench.core.errors import NeobenchError

BPE_PREFIX = "bpe:"


def parse_student_spec(spec: str) -> tuple[str, int | None]:
    """``pruned:15+bpe:16384`` -> ("pruned:15", 16384); any other spec -> (spec, None)."""
    base, plus, vocab = spec.partition("+")
    if not plus:
        return spec, None
    if not vocab.startswith(BPE_PREFIX) or not vocab[len(BPE_PREFIX):].isdigit():
        raise NeobenchError(f"student {spec!r}: after '+' expected bpe:V (a vocabulary size), e.g. pruned:15+bpe:16384")
    size = int(vocab[len(BPE_PREFIX):])
    if size < 512:
        raise NeobenchError(f"student {spec!r}: a vocabulary of {size} tokens is too small for byte-level BPE (256 bytes + merges); use 512 or more")
    return base, size


def training_texts(tokenizer, data_spec: str, split: str) -> list[str]:
    """The training split's conversations, rendered by the chat template as training renders them."""
    from neobench.data.examples import MalformedRow, is_empty, load_rows, to_messages

    texts = []
    for row in load_rows(data_spec, split):
        try:
            messages = to_messages(row)
        except MalformedRow:
            continue
        if not is_empty(messages):
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def train_bpe(teacher_tok, texts: list[str], vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens on ``texts``, with the teacher's special tokens and pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = sorted(teacher_tok.all_special_tokens, key=teacher_tok.convert_tokens_to_ids)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = teacher_tok.backend_tokenizer.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = teacher_tok.backend_tokenizer.post_processor
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=teacher_tok.bos_token, eos_token=teacher_tok.eos_token,
        pad_token=teacher_tok.pad_token, unk_token=teacher_tok.unk_token,
    )
    fast.chat_template = teacher_tok.chat_template
    return fast


@torch.no_grad()
def transplant_embedding(teacher_embedding: torch.Tensor, teacher_tok, student_tok) -> tuple[torch.Tensor, int]:
    """[V_student, H] rows for the student's tokens from the teacher's [V_teacher, H]; and how many were shared."""
    teacher_vocab = teacher_tok.get_vocab()
    teacher_bpe = teacher_tok.backend_tokenizer.model
    rows, shared = [], 0
    for token in student_tok.convert_ids_to_tokens(list(range(len(student_tok)))):
        if token in teacher_vocab:
            rows.append(teacher_embedding[teacher_vocab[token]])
            shared += 1
            continue
        pieces = [teacher_vocab[t.value] for t in teacher_bpe.tokenize(token) if t.value in teacher_vocab]
        # No pieces: a byte the teacher's vocabulary left out (0xC0 and 0xC1 never occur in UTF-8): the mean row.
        rows.append(teacher_embedding[pieces].mean(0) if pieces else teacher_embedding.mean(0))
    return torch.stack(rows), shared


def revocabulary_student_dir(pruned_dir: Path, teacher_path: str, vocab_size: int, data_spec: str, split: str) -> Path:
    """Build (once) and return the cached directory of the pruned student with its own BPE vocabulary."""
    from neobench.core.progress import console
    from neobench.models.loading import atomic_directory, cache_dir, load_causal_lm, load_tokenizer, model_fingerprint

    teacher_tok = load_tokenizer(teacher_path)
    texts = training_texts(teacher_tok, data_spec, split)
    if not texts:
        raise NeobenchError(f"no usable conversations in {data_spec}[{split}] to train a tokenizer on")
    digest = hashlib.sha256(json.dumps([model_fingerprint(str(pruned_dir)), vocab_size, texts]).encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{pruned_dir.name}-bpe{vocab_size}-{digest}"
    if (out / "config.json").is_file():
        return out
    console.print(f"training a {vocab_size}-token BPE on {len(texts)} conversations and rebuilding the student's embedding "
                  f"(once; cached in {out})", highlight=False, soft_wrap=True)
    student_tok = train_bpe(teacher_tok, texts, vocab_size)
    student = load_causal_lm(str(pruned_dir), torch.float32, "cpu")
    if not student.config.tie_word_embeddings:
        raise NeobenchError(f"{pruned_dir}: a new vocabulary needs a model whose output head is tied to its embedding")
    old_rows = student.get_input_embeddings().weight.shape[0]
    rows, shared = transplant_embedding(student.get_input_embeddings().weight, teacher_tok, student_tok)
    student.resize_token_embeddings(len(student_tok), mean_resizing=False)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(rows)
    student.tie_weights()
    for name in ("bos", "eos", "pad"):
        setattr(student.config, f"{name}_token_id", getattr(student_tok, f"{name}_token_id"))
    hidden = rows.shape[1]
    card = {
        "base": str(pruned_dir), "teacher": teacher_path, "vocab_size": len(student_tok),
        "tokenizer_training": {"data": data_spec, "split": split, "conversations": len(texts)},
        "shared_with_teacher": shared, "initialised_as_teacher_pieces_mean": len(student_tok) - shared,
        "embedding_parameters": {"before": old_rows * hidden, "after": len(student_tok) * hidden},
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    with atomic_directory(out) as tmp:
        student.save_pretrained(tmp)
        student_tok.save_pretrained(tmp)
        (tmp / "vocabulary_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out
