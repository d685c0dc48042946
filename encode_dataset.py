"""Encodes a moshi-finetune audio dataset into the token arrays `train.py --data` reads.

moshi-finetune's dataset (its README): a JSONL of `{"path": "a.wav", "duration": seconds}` lines
(paths relative to the JSONL's folder), stereo wavs (left channel: Moshi's voice, right: the
user's) and beside each wav a `.json` of word timestamps, `{"alignments": [[word, [start, end],
speaker], ...]}`. moshi-finetune encodes crops of `duration_sec` on the fly; this encodes whole
recordings once, so that training can take sequences of 12,000 to 24,000 frames. Each array is
[1 + 2 K, T] int32 (K = the model's dep_q, T frames at 12.5 Hz): the text stream, Moshi's K Mimi
codebooks, the user's K, as moshi-finetune's `InterleavedTokenizer` stacks them.

The text stream follows moshi-finetune's `Interleaver` with the settings of its 7B example
(`keep_main_only=True`, no BOS / EOS, no audio delay, words not shifted):
- words of the main speaker (`SPEAKER_MAIN`) with end > start are kept, sorted by start, and
  each is tokenized alone (SentencePiece, no BOS; a newline inside a word becomes its piece);
- at frame t, every word with start * 12.5 < t + 1 not taken yet is taken in order; a word taken
  replaces whatever tokens of an earlier word are still queued;
- each frame emits the next queued token; a frame without one is text padding (also inside a word,
  up to int(end * 12.5) of the last word taken); the padding frame just before an emitted token
  becomes end-of-text padding.
The padding ids are the model's (`existing_text_padding_id`, `existing_text_end_padding_id`).

A line may carry `"conversation": name` (this project's; moshi-finetune ignores the key): the
lines of one conversation become one array `<out>/<name>.npy`, their files joined in JSONL order,
each file encoded from a fresh Mimi state. Other lines give `<out>/<path without .wav>.npy`.

    python encode_dataset.py data/train.jsonl --mimi tokenizer-e351c8d8-checkpoint125.safetensors \\
        --tokenizer tokenizer_spm_32k_3.model --config config.json --out tokens
    python train.py --init model.safetensors --init-config config.json --data $(find tokens -name '*.npy') ...

Every input is checked before any encoding (one line, exit 2). Arrays already written are
skipped on a rerun; each is written to `.partial` and renamed, so a killed run leaves none half
written. Wavs are PCM at 24 kHz (what Mimi takes; other rates are refused, not resampled).
"""
import collections
import inspect
import json
import math
import os
import time
import typing as tp
import wave

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi loads
import torch  # noqa: E402

import eval_passkey  # noqa: E402  (its one-line error parser)

MAIN_SPEAKER = "SPEAKER_MAIN"
SAMPLE_RATE = 24_000  # Mimi's
FRAME_RATE = 12.5  # Mimi's frames per second
BLOCK_FRAMES = 250  # Mimi encodes a file in streaming blocks of 20 s: memory does not grow with the file

Alignment = tuple[str, tuple[float, float], str]  # word, (start, end) in seconds, speaker


# ---------------------------------------------------------------------------------------------
# The text stream: moshi-finetune's Interleaver, 7B example settings
# ---------------------------------------------------------------------------------------------

def word_tokens(tokenizer, word: str) -> list[int]:
    """A word's text tokens as moshi-finetune's `tokenize(..., bos=False)` gives them: each line
    encoded, the newline's piece between lines."""
    lines = tokenizer.encode(word.strip().split("\n"))
    tokens = list(lines[0])
    for line in lines[1:]:
        tokens += [tokenizer.encode("\n")[-1], *line]
    return tokens


def text_stream(alignments: list[Alignment], frames: int, tokenize: tp.Callable[[str], list[int]],
                padding: int, end_padding: int, frame_rate: float = FRAME_RATE) -> list[int]:
    """The text token of each of `frames` frames (the rules in the module docstring)."""
    words = sorted(alignments, key=lambda a: a[1][0])
    words = [(tokenize(w), start, end) for w, (start, end), speaker in words if speaker == MAIN_SPEAKER]
    words = [w for w in words if w[1] < w[2]]
    text, queue, i = [padding] * frames, collections.deque(), 0
    for t in range(frames):
        while i < len(words) and words[i][1] * frame_rate < t + 1:
            queue = collections.deque(words[i][0])  # a new word replaces what is left of the last
            i += 1
        if queue:
            if t > 0 and text[t - 1] == padding:
                text[t - 1] = end_padding
            text[t] = queue.popleft()
        # else padding: the Interleaver's in-word padding up to the last word's int(end * 12.5)
        # is the text padding itself in these settings, so a word's end changes nothing
    return text


# ---------------------------------------------------------------------------------------------
# Reading and checking the dataset
# ---------------------------------------------------------------------------------------------

def wav_info(path: str) -> tuple[int, int, int, int]:
    """(channels, sample rate, bytes per sample, samples) of a PCM wav; ValueError if unreadable."""
    try:
        with wave.open(path, "rb") as f:
            return f.getnchannels(), f.getframerate(), f.getsampwidth(), f.getnframes()
    except (OSError, EOFError, wave.Error) as e:
        raise ValueError(f"cannot read {path} as a PCM wav: {e}") from None


def read_wav(path: str) -> np.ndarray:
    """The wav's samples as float32 in [-1, 1], [channels, samples]."""
    with wave.open(path, "rb") as f:
        channels, width, raw = f.getnchannels(), f.getsampwidth(), f.readframes(f.getnframes())
    if width == 3:  # 24-bit: widen to 32 bits, the sign carried by the top byte
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16 | b[:, 2].astype(np.int8).astype(np.int32) << 24)
        x = x.astype(np.float32) / 2 ** 31
    elif width == 1:  # 8-bit wavs are unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    else:
        x = np.frombuffer(raw, {2: np.int16, 4: np.int32}[width]).astype(np.float32) / 2 ** (8 * width - 1)
    return x.reshape(-1, channels).T


def read_alignments(path: str) -> list[Alignment]:
    """The `alignments` of a moshi-finetune transcript json; ValueError naming what is wrong."""
    try:
        with open(path) as f:
            items = json.load(f)["alignments"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read alignments from {path}: {type(e).__name__} {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'alignments' is a {type(items).__name__}, expected a list")
    out = []
    for n, a in enumerate(items):
        try:
            word, (start, end), speaker = a
            if not (isinstance(word, str) and isinstance(speaker, str)
                    and all(isinstance(x, (int, float)) and math.isfinite(x) for x in (start, end))):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{path}: alignment {n} is {a!r}, expected [word, [start, end], speaker]") from None
        out.append((word, (float(start), float(end)), speaker))
    return out


def plan(jsonl: str, out: str, newline_piece: bool = True) -> list[tuple[str, list[str]]]:
    """[(array path, [wav paths in order])] from the JSONL; ValueError on a bad line or file
    (`newline_piece`: whether the tokenizer has a piece for a newline inside a word)."""
    root, groups, names, seen = os.path.dirname(os.path.realpath(jsonl)), {}, {}, set()
    try:
        lines = open(jsonl).read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {jsonl}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path, duration = entry["path"], float(entry["duration"])
            if not isinstance(path, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{jsonl}:{n}: expected {{\"path\": ..., \"duration\": seconds}}, got {line[:100]!r}") from None
        wav = os.path.join(root, path)
        if os.path.realpath(wav) in seen:
            raise ValueError(f"{jsonl}:{n}: {path} is listed twice")
        seen.add(os.path.realpath(wav))
        channels, rate, width, samples = wav_info(wav)
        if channels != 2:
            raise ValueError(f"{wav} has {channels} channel(s); expected stereo (left: Moshi, right: the user)")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{wav} is at {rate} Hz; Mimi takes {SAMPLE_RATE} Hz (resample it first, e.g. "
                             f"ffmpeg -i in.wav -ar {SAMPLE_RATE} out.wav)")
        if samples == 0 or os.path.getsize(wav) < samples * channels * width:
            raise ValueError(f"{wav} holds {'no audio' if samples == 0 else 'less audio than its header says'}")
        if not abs(samples / rate - duration) <= 1.0:
            raise ValueError(f"{jsonl}:{n}: duration {duration} s, but {wav} lasts {samples / rate:.2f} s")
        words = read_alignments(os.path.splitext(wav)[0] + ".json")
        if not newline_piece and any("\n" in w.strip() for w, _, _ in words):
            raise ValueError(f"{os.path.splitext(wav)[0]}.json has a word with a newline and the tokenizer no "
                             "piece for it")
        conversation = entry.get("conversation")
        if conversation is not None and (not isinstance(conversation, str) or not conversation
                                         or conversation.startswith(".") or "/" in conversation or "\\" in conversation):
            raise ValueError(f"{jsonl}:{n}: conversation {conversation!r} is not a file name")
        name = conversation if conversation is not None else os.path.splitext(os.path.relpath(wav, root))[0]
        if name.startswith(".."):
            raise ValueError(f"{jsonl}:{n}: {path} lies outside the JSONL's folder; its array would leave --out")
        target = os.path.join(out, name + ".npy")
        if names.setdefault(target, conversation) != conversation:
            raise ValueError(f"{jsonl}:{n}: {target} would hold two different recordings")
        groups.setdefault(target, []).append(wav)
    if not groups:
        raise ValueError(f"{jsonl} lists no recording")
    return list(groups.items())


def model_ids(config: tp.Optional[str]) -> dict:
    """text_card, card, n_q, dep_q and the two padding ids of the model (its config.json, bare LMModel
    arguments or under "lm_kwargs"; default: moshi's Moshi 7B configuration)."""
    from moshi.models import loaders
    from moshi.models.lm import LMModel
    kwargs = loaders._lm_kwargs
    if config is not None:
        try:
            kwargs = json.load(open(config))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the model config {config}: {e}") from None
        kwargs = kwargs.get("lm_kwargs", kwargs) if isinstance(kwargs, dict) else None
        if not isinstance(kwargs, dict):
            raise ValueError(f"{config} does not hold LMModel arguments")
    defaults = {k: p.default for k, p in inspect.signature(LMModel.__init__).parameters.items()}
    ids = {k: kwargs.get(k, defaults[k]) for k in ("text_card", "card", "n_q", "dep_q", "existing_text_padding_id",
                                                   "existing_text_end_padding_id")}
    if ids["n_q"] != 2 * ids["dep_q"]:
        raise ValueError(f"the model has n_q {ids['n_q']} and dep_q {ids['dep_q']}: a stereo dataset needs "
                         "n_q = 2 dep_q (Moshi's codebooks, then the user's)")
    return ids


def load_tokenizer(path: str, text_card: int):
    import sentencepiece
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path} does not exist")
    tokenizer = sentencepiece.SentencePieceProcessor()
    try:
        tokenizer.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load the SentencePiece model {path}: {str(e).splitlines()[0][:100]}") from None
    if tokenizer.vocab_size() != text_card:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size()} pieces, the model's text card is "
                         f"{text_card}: not the model's tokenizer")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def widen_kv_caches(mimi, block_samples: int) -> None:
    """In streaming, moshi's attention keeps a ring of `context` keys, so a block of n steps
    overwrites keys its own first queries still need (the mask allows `context` back). Rings of
    context + n steps keep them all: each query sees the keys of a whole-file encode."""
    from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention
    steps = math.ceil(block_samples * mimi.encoder_frame_rate / mimi.sample_rate)  # encoder transformer steps
    for module in mimi.encoder_transformer.modules():
        if isinstance(module, StreamingMultiheadAttention) and module._streaming_state is not None:
            old = module._streaming_state.kv_cache
            _, B, H, capacity, D = old.cache.shape
            module._streaming_state.kv_cache = RingKVCache(B, H, D, capacity + steps, old.respect_exec_mask,
                                                           old.cache.device, old.cache.dtype)


@torch.no_grad()
def encode_audio(mimi, audio: np.ndarray, device) -> torch.Tensor:
    """Mimi's codes of both channels, [2 K, T] (channel 0's K codebooks, then channel 1's), T =
    ceil(samples / frame size): the codes of one encode of the whole file (its tail zero-padded to
    a frame, as Mimi pads it), computed in streaming blocks from a fresh state so that memory does
    not grow with the file. (moshi-finetune encodes each crop of `duration_sec`, 100 s in its 7B
    example, from a fresh state: past 100 s its codes and these differ where the encoder's
    receptive field crosses a crop's start.)"""
    from moshi.utils.compile import no_cuda_graph
    x = torch.from_numpy(audio).to(device)[:, None]  # [2, 1, samples]
    x = torch.nn.functional.pad(x, (0, -x.shape[-1] % mimi.frame_size))
    block, codes = BLOCK_FRAMES * mimi.frame_size, []
    with no_cuda_graph(), mimi.streaming(batch_size=2):  # blocks of many frames: graphs would gain nothing
        widen_kv_caches(mimi, block)
        for start in range(0, x.shape[-1], block):
            codes.append(mimi.encode(x[..., start:start + block]))
    codes = torch.cat(codes, dim=-1)  # [2, K, T]
    return codes.reshape(-1, codes.shape[-1]).cpu()


def encode_recording(mimi, tokenizer, ids: dict, wav: str, device) -> np.ndarray:
    """One recording as [1 + 2 K, T] int32: its text stream over the frames Mimi gives, then the codes."""
    audio = encode_audio(mimi, read_wav(wav), device)
    text = text_stream(read_alignments(os.path.splitext(wav)[0] + ".json"), audio.shape[-1],
                       lambda w: word_tokens(tokenizer, w), ids["existing_text_padding_id"],
                       ids["existing_text_end_padding_id"])
    return np.concatenate([np.asarray(text, np.int32)[None], audio.numpy().astype(np.int32)])


def save_atomic(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def main(argv=None) -> None:
    p = eval_passkey.OneLineParser(prog="encode_dataset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", help="moshi-finetune's dataset: lines of {\"path\": wav, \"duration\": seconds}")
    p.add_argument("--mimi", required=True, help="Mimi's weights (the Moshi release's tokenizer-*.safetensors)")
    p.add_argument("--tokenizer", required=True, help="the model's SentencePiece model (tokenizer_spm_32k_3.model)")
    p.add_argument("--config", default=None, help="the model's config.json (default: moshi's Moshi 7B configuration)")
    p.add_argument("--out", required=True, help="folder of the .npy arrays")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:  # every input, before any encoding
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} exists and is not a folder")
        if not os.path.isfile(args.mimi):
            raise ValueError(f"--mimi {args.mimi} does not exist")
        ids = model_ids(args.config)
        tokenizer = load_tokenizer(args.tokenizer, ids["text_card"])
        jobs = plan(args.jsonl, args.out, newline_piece=bool(tokenizer.encode("\n")))
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here")
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    from moshi.models import loaders
    try:
        mimi = loaders.get_mimi(args.mimi, num_codebooks=ids["dep_q"], device=device).eval()
    except Exception as e:  # what safetensors or load_state_dict raise on a file that is not Mimi's
        p.error(f"cannot load Mimi from {args.mimi}: {str(e).splitlines()[0][:200]}")
    if mimi.cardinality != ids["card"]:
        p.error(f"Mimi has {mimi.cardinality} codes per codebook, the model's audio card is {ids['card']}")
    todo = [(target, wavs) for target, wavs in jobs if not os.path.exists(target)]
    print(f"encode: {len(jobs)} arrays ({len(jobs) - len(todo)} already written), {sum(len(w) for _, w in todo)} "
          f"recordings to encode on {device}", flush=True)
    for n, (target, wavs) in enumerate(todo, 1):
        start, parts = time.time(), [encode_recording(mimi, tokenizer, ids, wav, device) for wav in wavs]
        array = np.concatenate(parts, axis=1)
        save_atomic(target, array)
        seconds = array.shape[1] / FRAME_RATE
        took = time.time() - start
        print(f"[{n}/{len(todo)}] {target}: {len(wavs)} file(s), {array.shape[1]} frames ({seconds:.0f} s of audio) "
              f"in {took:.1f} s ({seconds / max(took, 1e-9):.0f}x real time)", flush=True)


if __name__ == "__main__":
    main()
