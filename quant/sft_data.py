"""Training data for qlora: files or the model's own samples -> fixed-length token windows with a
mask saying which targets are trained on.

Files are read by quant.data's rules, as calibration and evaluation read them: plain text, or
JSONL with one example per line:
- chat: {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
  rendered with the tokenizer's chat template; only the assistant turns are targets;
- prompt/response: {"prompt": ..., "response": ...}, i.e. a one-turn chat;
- text: {"text": ...} or a JSON string: every token is a target, as in a plain-text file (which is
  one example).
With no file, the BF16 model writes its own training text (data-free, as in LLM-QAT).

Examples are packed end to end and cut into windows of seq_len + 1 tokens (inputs and shifted
targets), so no compute goes to padding. Preference pairs for DPO are read here too.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.errors import PtekitError
from quant.data import is_jsonl, jsonl_records, read_file, record_text

SELF_GENERATED = "self"  # `--data self`: generate the training text from the BF16 model
GEN_BATCH = 64  # sequences the model writes at once (self_generated), and kept at once (own_text)


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # True where the token is a training target (a response token)


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class Windows:
    tokens: torch.Tensor  # [N, seq_len + 1] int64
    mask: torch.Tensor  # [N, seq_len + 1] bool; mask[:, 1:] marks the trained targets

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1


# --- reading files -----------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A training file's text, by quant.data's rules; the records are read from it below."""
    text = read_file(path, "training data file", "--data")
    if not text.strip():
        raise PtekitError(f"{path}: the file is empty; give text or JSONL examples to train on")
    return text


def load_examples(path: Path, tok) -> list[Example]:
    """A training file (chat, prompt/response or text JSONL, or plain text) -> examples."""
    path = Path(path)
    text = read_text(path)
    if not is_jsonl(path, text):
        return [text_example(text, tok)]
    examples = []
    for n, rec in jsonl_records(path, text, strings=True):
        where = f"{path}:{n}"
        if isinstance(rec, dict) and "messages" in rec:
            examples.append(chat_example(rec["messages"], tok, where))
        elif isinstance(rec, dict) and "prompt" in rec and "response" in rec:
            messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
            examples.append(chat_example(messages, tok, where))
        elif isinstance(rec, str) or isinstance(rec.get("text"), str):
            examples.append(text_example(record_text(rec, where), tok))
        else:
            raise PtekitError(
                f"{where}: unknown record with keys {sorted(rec)}; expected {{\"messages\": [...]}}, "
                "{\"prompt\": ..., \"response\": ...} or {\"text\": ...}"
            )
    return examples


def text_example(text: str, tok) -> Example:
    """Plain text: every token is a target."""
    ids = tok.encode(text)
    return Example(ids, [True] * len(ids))


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise PtekitError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PtekitError(f"{where}: every message needs a string \"role\" and a string \"content\"; got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise PtekitError(f"{where}: no assistant message, so nothing to train on; add the assistant's reply")


def render_chat(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if not tok.chat_template:
        # No template: a plain transcript, the assistant's turn opened by its role name.
        body = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return body + ("assistant: " if add_generation_prompt else "")
    import jinja2

    tmpl = jinja2.Environment().from_string(tok.chat_template)
    return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token="")


def chat_example(messages, tok, where: str) -> Example:
    """Tokens of the rendered chat; the assistant turns (with their end-of-turn marker) are targets."""
    _check_messages(messages, where)
    pieces: list[tuple[str, bool]] = []  # (text, is_target)
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            header = render_chat(tok, messages[:i], add_generation_prompt=True)
            pieces.append((_suffix(header, done, where), False))
            done = header
        cur = render_chat(tok, messages[: i + 1], add_generation_prompt=False)
        pieces.append((_suffix(cur, done, where), m["role"] == "assistant"))
        done = cur
    tokens, mask = [], []
    if getattr(tok, "add_bos", False) and tok.bos_id is not None:
        tokens, mask = [tok.bos_id], [False]
    for text, target in pieces:
        ids = tok.encode(text)
        tokens += ids
        mask += [target] * len(ids)
    if not tok.chat_template and tok.eos_ids:
        tokens.append(tok.eos_ids[0])
        mask.append(True)
    return Example(tokens, mask)


def _suffix(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise PtekitError(
            f"{where}: the tokenizer's chat template renders this conversation differently turn by turn, "
            "so its assistant turns cannot be located; give {\"prompt\", \"response\"} records or plain text"
        )
    return text[len(prefix):]


def load_preferences(path: Path, tok) -> list[PreferencePair]:
    """JSONL of {"prompt", "chosen", "rejected"} -> token pairs (the prompt in the chat template)."""
    path = Path(path)
    text = read_text(path)
    pairs = []
    for n, rec in jsonl_records(path, text):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec.get(k), str)]
        if missing:
            raise PtekitError(f"{path}:{n}: preference records need string \"prompt\", \"chosen\" and \"rejected\"; "
                              f"missing or not a string: {', '.join(missing)}")
        prompt = chat_example([{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": ""}],
                              tok, f"{path}:{n}")
        # The prompt is everything before the (empty) assistant reply; each answer is then
        # rendered as that reply, so chosen and rejected end with the same end-of-turn marker.
        n_prompt = prompt.mask.index(True) if True in prompt.mask else len(prompt.tokens)
        answers = []
        for key in ("chosen", "rejected"):
            ex = chat_example([{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec[key]}],
                              tok, f"{path}:{n}")
            answers.append(ex.tokens[n_prompt:])
        pairs.append(PreferencePair(prompt.tokens[:n_prompt], *answers))
    return pairs


# --- data-free: the model writes its own training text ------------------------------------------


@torch.no_grad()
def self_generated(model, tok, n_sequences: int, length: int, seed: int = 0, batch: int = GEN_BATCH,
                   greedy_tokens: int = 3, progress: bool = True, what: str = "training text",
                   state: torch.Tensor | None = None, on_batch=None) -> list[Example]:
    """LLM-QAT's data-free recipe: a random first token, a few greedy tokens, then sampling.

    Uses the model's eager KV-cache path with a cache of `batch` rows; the caches are removed
    afterwards so the model trains as before. Batches are independent of each other but for the random
    generator: state (a generator state that on_batch was given) continues a call where it stopped, in place
    of seed; on_batch(examples, state), if given, is called after each batch of `batch` sequences with them
    and the generator's state after them.
    """
    from exporter.progress import bar as progress_bar

    cfg = model.config
    if length - 1 > cfg.max_seq_len:  # the last token is sampled, never fed back
        raise PtekitError(f"self-generated data: length {length} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                          "export with a larger --max-seq-len or train on shorter windows")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    if state is not None:
        g.set_state(state)
    out: list[Example] = []
    was_training = model.training
    model.eval()
    bar = progress_bar(total=n_sequences * (length - 1), desc=f"generating {what}", unit="tok", disable=not progress,
               dynamic_ncols=True)
    try:
        for first in range(0, n_sequences, batch):
            b = min(batch, n_sequences - first)
            for layer in model.layers:
                shape = (b, length, cfg.n_kv_heads, cfg.head_dim)  # the eager path reads only what was written
                layer.attention.k_cache = torch.zeros(shape, device=device)
                layer.attention.v_cache = torch.zeros(shape, device=device)
            seq = torch.randint(0, cfg.vocab_size, (b, 1), generator=g)
            logits = model(seq.to(device), torch.tensor([0], device=device))[:, -1].float().cpu()
            for pos in range(1, length):
                if pos <= greedy_tokens:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                seq = torch.cat([seq, nxt], 1)
                bar.update(b)
                if pos < length - 1:
                    logits = model(nxt.to(device), torch.tensor([pos], device=device))[:, -1].float().cpu()
            examples = [Example(s.tolist(), [True] * length) for s in seq]
            out += examples
            if on_batch is not None and b == batch:
                on_batch(examples, g.get_state())
    finally:
        for layer in model.layers:
            layer.attention.k_cache = layer.attention.v_cache = None
        bar.close()
        model.train(was_training)
    return out


def own_text_dir() -> Path:
    """Where own_text keeps the text models write: under ptekit's cache (exporter.defaults.cache_dir), not in
    a method's work directory, so that spinquant and qlora, and exports to other outputs or with other
    options, read the text one run wrote."""
    from exporter.defaults import cache_dir

    return cache_dir() / "own-text"


def own_text(model, tok, n_sequences: int, length: int, seed: int, directory: Path, weights: str,
             progress: bool = True, what: str = "training text") -> list[Example]:
    """self_generated's sequences, kept in `directory` (own_text_dir() for the methods) under a name made of
    what they depend on (`weights`: quant.method.weights_hash of the model; the count, length and seed), so
    that a later run reads them instead of writing them again (about 13 minutes for SmolLM2's 256 x 513
    tokens on 2 CPU cores). spinquant and qlora ask for the same text: the same checkpoint, count, length
    and seed give the same file to either. Two processes that need the same text at once write it once:
    the second waits for the first (exporter.atomic.held_lock).

    While it is written, each finished batch of GEN_BATCH sequences is kept too, with the random generator's
    state after it (_kept_batches): a run that was interrupted, or that asked for fewer sequences, leaves
    them, and a later call writes only the sequences after them. The text is the text of one uninterrupted
    call, because each batch depends on the ones before it only through the generator."""
    from exporter.atomic import held_lock

    key = hashlib.sha256(json.dumps([weights, n_sequences, length, seed]).encode()).hexdigest()[:16]
    cache = Path(directory) / f"own-text-{key}.jsonl"
    if cache.exists():
        return read_examples(cache)
    with held_lock(cache):
        if not cache.exists():  # else another process wrote it while this one waited
            _write_own_text(cache, model, tok, n_sequences, length, seed, weights, progress, what)
    return read_examples(cache)


def _write_own_text(cache: Path, model, tok, n_sequences: int, length: int, seed: int, weights: str,
                    progress: bool, what: str) -> None:
    from exporter.atomic import write_text

    batch_key = hashlib.sha256(json.dumps([weights, length, seed, GEN_BATCH]).encode()).hexdigest()[:16]
    batches = cache.parent / f"own-text-{batch_key}.batches"
    kept, state = _kept_batches(batches, n_sequences // GEN_BATCH, length)
    done = len(kept) // GEN_BATCH

    def keep(examples: list[Example], after: torch.Tensor) -> None:
        nonlocal done
        batches.mkdir(exist_ok=True)
        write_text(batches / f"{done:05d}.json", json.dumps(
            {"tokens": [e.tokens for e in examples], "state": base64.b64encode(bytes(after.tolist())).decode()}))
        done += 1

    rest = []
    if len(kept) < n_sequences:
        rest = self_generated(model, tok, n_sequences - len(kept), length, seed=seed, batch=GEN_BATCH,
                              progress=progress, what=what, state=state, on_batch=keep)
    save_examples(cache, kept + rest)


def _kept_batches(d: Path, at_most: int, length: int) -> tuple[list[Example], torch.Tensor | None]:
    """The first batches in d that own_text kept, at most `at_most` of them, and the generator's state after
    the last of them (None: none kept). An unreadable batch ends the list; it is written again."""
    kept, state = [], None
    for i in range(at_most):
        try:
            rec = json.loads((d / f"{i:05d}.json").read_text())
            tokens, after = rec["tokens"], torch.tensor(list(base64.b64decode(rec["state"])), dtype=torch.uint8)
        except (OSError, ValueError, KeyError, TypeError):
            break
        if len(tokens) != GEN_BATCH or any(len(t) != length for t in tokens):
            break
        kept += [Example(t, [True] * length) for t in tokens]
        state = after
    return kept, state


def save_examples(path: Path, examples: list[Example]) -> None:
    from exporter.atomic import write_text

    write_text(path, "".join(json.dumps({"tokens": e.tokens, "mask": e.mask}) + "\n" for e in examples))


def read_examples(path: Path) -> list[Example]:
    return [Example(r["tokens"], r["mask"]) for r in map(json.loads, Path(path).read_text().splitlines())]


# --- packing -----------------------------------------------------------------------------------


def pack(examples: list[Example], seq_len: int, source: str) -> Windows:
    """End-to-end packing into windows of seq_len + 1 tokens; windows with no target are dropped."""
    tokens = [t for e in examples for t in e.tokens]
    mask = [m for e in examples for m in e.mask]
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise PtekitError(f"{source}: only {len(tokens)} tokens, fewer than one training window of {seq_len + 1}; "
                          "give more data or a shorter sequence length")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    t = torch.tensor(tokens, dtype=torch.long)[idx]
    m = torch.tensor(mask, dtype=torch.bool)[idx]
    keep = m[:, 1:].any(1)
    if not keep.any():
        raise PtekitError(f"{source}: no window holds a response token to train on; check the assistant turns")
    return Windows(t[keep], m[keep])


def check_vocab(windows: Windows, vocab_size: int, source: str) -> None:
    top = int(windows.tokens.max())
    if top >= vocab_size:
        raise PtekitError(f"{source}: token id {top} is outside the model's vocabulary of {vocab_size}; "
                          "the tokenizer does not belong to this model")
