"""Train the bundled demo pair on arithmetic word problems, on a CPU, in about an hour.

    python training/train_demo.py --phase dllm-ar --minutes 19 --batch 32          # the dLLM's shape, trained AR
    python training/train_demo.py --phase verifier --minutes 6                     # the AR verifier
    python training/train_demo.py --phase dllm-diffusion --minutes 21 --batch 32 --lr 2e-4 --first-weight 4
    python training/train_demo.py --phase dllm-diffusion --resume --minutes 16 --batch 24 --first-weight 1 ...

(`training/train_all.sh` runs the exact commands.) Training a masked-diffusion model from scratch
learns far too slowly at this budget, so the dLLM is made the way Dream 7B was made from Qwen2.5
7B: an autoregressive model of the dLLM's shape is trained first, then its weights are switched to
bidirectional attention and trained with the masked-diffusion objective. Dream's shifted-logit
convention (the output at position j-1 predicts token j) is the AR convention, so it carries over.
The diffusion phase's learning rate is low (2e-4): at 1e-3 the switch to bidirectional attention
wiped out what the AR phase had learnt (57% to 3% of the validation problems) and it took over 20
minutes to climb back to 20%; at 2e-4 the first phase climbs from the AR weights' 52% to 97%.
Most diffusion rows mask a suffix of the answer, the state left-to-right and APD decoding see; the
rest mask random positions. In the first diffusion phase each row's first masked position counts 4
times more, since that is the token one-token-per-step decoding commits and the place where the
model must read what was just committed (which operand came first); the second weights every masked
position alike, which drafts the positions further ahead better. Each batch draws its canvas length
(answer, EOS, EOS padding) from 32..100, most from 32..40, so the dLLM answers the same whatever
`--max-new-tokens` a user sets.

The verifier is tiny and learns from questions told with a random template's words (the numbers,
name and items kept): it reads which numbers a question gives, but not whether it adds or
subtracts them. So it checks a draft's arithmetic, operands and form, which is APD's use of it,
yet alone it must guess the operations and solves about half the problems, as the paper's 0.5B
verifier is far weaker than its 7B dLLM. It is kept by how well it checks: the share of
validation solutions whose every result digit it predicts from the solution before it.
Checkpoints are written as ordinary Hugging Face directories that `apd-deploy export` takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer import ASSISTANT, EOS, MASK, USER, build_tokenizer, save_tokenizer  # noqa: E402

from apd_deploy.export.config import ModelConfig  # noqa: E402
from apd_deploy.export.transformer import DecoderLM  # noqa: E402
from apd_deploy.tasks.arithmetic import ITEMS, NAMES, TEMPLATES, extract_answer, problems  # noqa: E402

# Answer positions: the solution (at most 28 tokens), EOS, then EOS padding; one length per batch.
CANVASES = range(32, 101)
VALIDATION_CANVASES = (32, 96)
MAX_POSITIONS = 160  # the longest prompt (29 tokens) and 128 new tokens
DLLM_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
VERIFIER_LOGIT_SCALE = 3.0  # see `scale_logits`
VERIFIER_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Data:
    def __init__(self, seed: int) -> None:
        corpus = [p.question + " " + p.solution for p in itertools.islice(problems("train", seed=10_000), 20_000)]
        self.tokenizer = build_tokenizer(corpus)
        self.ids = {t: self.tokenizer.token_to_id(t) for t in (EOS, USER, ASSISTANT, MASK)}
        self.train = problems("train", seed=seed)
        self.validation = list(itertools.islice(problems("validation"), 200))

    def encode(self, problem, rewording: random.Random | None = None) -> tuple[list[int], list[int]]:
        """With `rewording`, the question is told with a random template's words (same numbers,
        name and items): which operations it asks for is no longer in it."""
        question = problem.question
        if rewording is not None:
            a, b, c = re.findall(r"\d+", question)
            words = set(re.findall(r"[A-Za-z]+", question))
            name = next((n for n in NAMES if n in words), None) or rewording.choice(NAMES)
            item = next(i for i in ITEMS if i in words)
            question = rewording.choice(TEMPLATES).question.format(name=name, item=item, a=a, b=b, c=c)
        prompt = self.tokenizer.encode(USER + question + ASSISTANT).ids
        answer = self.tokenizer.encode(problem.solution).ids + [self.ids[EOS]]
        return prompt, answer


def config(shape: dict, vocab: int, causal: bool, data: Data, tied: bool) -> ModelConfig:
    eos = data.ids[EOS]
    return ModelConfig(
        model_type="qwen2" if causal else "Dream", vocab_size=vocab, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=tied,
        causal=causal, mask_token_id=data.ids[MASK], pad_token_id=eos, bos_token_id=eos, eos_token_ids=(eos,), **shape)


def new_model(cfg: ModelConfig, seed: int) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(cfg, qkv_bias=True)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model


def forward(model: DecoderLM, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    logits, _ = model(ids, positions, valid, model.empty_cache(ids.shape[0]))
    return logits


def ar_batch(data: Data, batch, rewording: random.Random | None = None):
    """Prompt and answer rows, EOS-padded on the right; `loss_at` marks the answer tokens."""
    rows, targets = [], []
    for problem in batch:
        prompt, answer = data.encode(problem, rewording)
        rows.append(prompt + answer)
        targets.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), data.ids[EOS])
    valid = torch.zeros(len(rows), width, dtype=torch.int64)
    loss_at = torch.zeros(len(rows), width)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, : len(row)], valid[i, : len(row)], loss_at[i, : len(row)] = torch.tensor(row), 1, torch.tensor(target, dtype=torch.float)
    return ids, valid, loss_at


def ar_loss(model: DecoderLM, data: Data, size: int, rewording: random.Random | None = None) -> torch.Tensor:
    ids, valid, loss_at = ar_batch(data, itertools.islice(data.train, size), rewording)
    logits = forward(model, ids, valid)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    weights = loss_at[:, 1:]
    return (ce * weights).sum() / weights.sum()


def canvas_length(rng: random.Random) -> int:
    """80% of the batches at 32..40, just past the longest answer (28 tokens and its EOS), 20% anywhere
    in 32..100: long canvases are mostly padding, which costs compute (a step at 36 takes 0.48 s, at
    53 0.63 s) and is quickly learnt."""
    return rng.choice(CANVASES[:9] if rng.random() < 0.8 else CANVASES)


def diffusion_loss(model: DecoderLM, data: Data, size: int, rng: random.Random, suffix_share: float,
                   first_weight: float) -> torch.Tensor:
    rows = []
    length = canvas_length(rng)
    # Padding after the answer's EOS is easy and plentiful: all of it counts as about six positions.
    padding = 0.2 * 32 / length
    for problem in itertools.islice(data.train, size):
        prompt, answer = data.encode(problem)
        canvas = answer + [data.ids[EOS]] * (length - len(answer))
        if rng.random() < suffix_share:  # a committed prefix, everything after it masked
            start = rng.randrange(min(length, len(answer) + 4))
            hide = [j >= start for j in range(length)]
        else:
            ratio = rng.uniform(0.05, 1.0)
            hide = [rng.random() < ratio for _ in range(length)]
            hide[rng.randrange(len(answer))] = True
        weight = [(1.0 if j < len(answer) else padding) if h else 0.0 for j, h in enumerate(hide)]
        rows.append((prompt, canvas, hide, weight))
    width = max(len(p) for p, *_ in rows) + length
    ids = torch.full((size, width), data.ids[EOS])
    targets = torch.full((size, width), data.ids[EOS])
    valid = torch.zeros(size, width, dtype=torch.int64)
    weights = torch.zeros(size, width)
    first = torch.zeros(size, width)
    for i, (prompt, canvas, hide, weight) in enumerate(rows):
        n = len(prompt) + length
        full = torch.tensor(prompt + canvas)
        targets[i, :n] = full
        ids[i, :n] = torch.where(torch.tensor([False] * len(prompt) + hide), data.ids[MASK], full)
        valid[i, :n] = 1
        weights[i, len(prompt) : n] = torch.tensor(weight)
        first[i, len(prompt) + hide.index(True)] = 1.0
    logits = forward(model, ids, valid)
    # Shifted logits: the row of position j-1 predicts token j.
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none")
    w, f = weights[:, 1:], first[:, 1:]
    per_row = (ce * w).sum(1) / w.sum(1).clamp(min=1e-6)
    # The first masked position is what one-token-per-step decoding commits, and where the model
    # must read what was committed just before it (the operands' order): count it `first_weight` more.
    return (per_row + first_weight * (ce * f).sum(1)).mean()


@torch.no_grad()
def accuracy(model: DecoderLM, data: Data, n: int = 200, canvas: int = 32) -> float:
    """Greedy one token per step over the whole canvas (no cache), left-padded batch, until every
    row has its EOS."""
    model.eval()
    encoded = [data.encode(p)[0] for p in data.validation[:n]]
    width = max(map(len, encoded))
    ids = torch.full((n, width + canvas), data.ids[MASK] if not model.config.causal else data.ids[EOS])
    valid = torch.ones(n, width + canvas, dtype=torch.int64)
    for i, prompt in enumerate(encoded):
        ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        valid[i, : width - len(prompt)] = 0
    for k in range(canvas):
        end = width + k if model.config.causal else width + canvas
        logits = forward(model, ids[:, :end], valid[:, :end])
        ids[:, width + k] = logits[:, width + k - 1, : data.tokenizer.get_vocab_size()].argmax(-1)
        if (ids[:, width : width + k + 1] == data.ids[EOS]).any(1).all():
            ids[:, width + k + 1 :] = data.ids[EOS]
            break
    correct = 0
    for i, problem in enumerate(data.validation[:n]):
        answer = ids[i, width:].tolist()
        answer = answer[: answer.index(data.ids[EOS])] if data.ids[EOS] in answer else answer
        correct += extract_answer(data.tokenizer.decode(answer)) == problem.answer
    model.train()
    return correct / n


@torch.no_grad()
def checks(model: DecoderLM, data: Data, n: int = 200) -> float:
    """Share of validation solutions whose every result token (the digits after "=", "is" or ":"),
    fed the solution before it, is the AR model's greedy prediction: how well it checks a draft."""
    model.eval()
    ids, valid, answer_at = ar_batch(data, data.validation[:n])
    predicted = forward(model, ids, valid).argmax(-1)
    right = 0
    for row, guesses, at in zip(ids.tolist(), predicted.tolist(), answer_at.bool().tolist()):
        in_result, ok = False, True
        for j in (j for j in range(len(row)) if at[j]):
            piece = data.tokenizer.decode([row[j]])
            if in_result and piece.strip().isdigit():
                ok &= guesses[j - 1] == row[j]
            in_result = piece in (" =", " is", ":") or (in_result and piece.strip().isdigit())
        right += ok
    model.train()
    return right / n


def verifier_scores(model: DecoderLM, data: Data) -> dict:
    """The verifier is kept for how well it checks solutions, not for what it solves alone."""
    return {"accuracy": checks(model, data), "alone": accuracy(model, data)}


def validate(model: DecoderLM, data: Data, canvases: tuple[int, ...]) -> dict:
    """Validation accuracy at each canvas length; `accuracy` is the worst of them."""
    if len(canvases) == 1:
        return {"accuracy": accuracy(model, data, 200, canvases[0])}
    each = {f"accuracy_{canvas}": accuracy(model, data, 100, canvas) for canvas in canvases}
    return {"accuracy": min(each.values()), **each}


def train(model: DecoderLM, loss_fn, minutes: float, lr: float, eval_every: float, record: dict,
          score: Callable[[DecoderLM], dict]) -> DecoderLM:
    """Train for `minutes`; keep the checkpoint whose `score(model)["accuracy"]` is best."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, next_eval, step = time.time(), eval_every, 0
    best = (-1.0, None)
    losses = []

    def evaluate(elapsed: float) -> None:
        nonlocal best
        scores = score(model)
        log(f"validation {json.dumps(scores)} at step {step}")
        record["evaluations"].append({"minutes": round(elapsed, 1), "step": step, **scores,
                                      "loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4)})
        model.train()
        if scores["accuracy"] >= best[0]:
            best = (scores["accuracy"], {k: v.clone() for k, v in model.state_dict().items()})

    model.train()
    while (elapsed := (time.time() - start) / 60) < minutes:
        warm = min(1.0, (step + 1) / 100)
        for group in optimiser.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / minutes)))
        loss = loss_fn(model)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"step {step} loss {sum(losses[-50:]) / 50:.4f} ({elapsed:.1f} min)")
        if elapsed >= next_eval:
            evaluate(elapsed)
            next_eval = (time.time() - start) / 60 + eval_every  # validation time is not training time
    evaluate((time.time() - start) / 60)
    record.update(steps=step, final_loss=record["evaluations"][-1]["loss"], best_validation_accuracy=best[0])
    model.load_state_dict(best[1])
    return model


@torch.no_grad()
def scale_logits(model: DecoderLM, scale: float) -> None:
    """Multiply the model's logits by `scale` (its final norm's weight; greedy choices unchanged).
    APD's mixture raises the verifier's distribution to the power 1 - R (0.3): a verifier that is
    right on every result digit is still too unsure for that, and at temperature 1 the mixture then
    samples wrong digits (6-minute verifier: APD 83% at x2, 87% at x3, one token per step 88%)."""
    model.model.norm.weight.mul_(scale)


def save(model: DecoderLM, data: Data, directory: Path, architecture: str) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [architecture], "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False,
        "sliding_window": None, "rope_scaling": None, "torch_dtype": "float32",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0], "pad_token_id": cfg.pad_token_id,
    }
    if cfg.model_type == "Dream":
        config["mask_token_id"] = cfg.mask_token_id
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(data.tokenizer, directory)


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("verifier", "dllm-ar", "dllm-diffusion"), required=True)
    parser.add_argument("--out", type=Path, default=Path("models/arithmetic"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/apd-train"), help="intermediate checkpoints")
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="dllm-diffusion: continue from OUT/dllm")
    parser.add_argument("--record", default=None,
                        help="name of the JSON record written to OUT  [default: training-PHASE.json]")
    parser.add_argument("--first-weight", type=float, default=1.0,
                        help="dllm-diffusion: extra loss weight of each row's first masked position")
    parser.add_argument("--eval-minutes", type=float, default=None, help="minutes between validations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Data(args.seed)
    vocab = data.tokenizer.get_vocab_size()
    record = {"phase": args.phase, "command": " ".join(sys.argv), "seed": args.seed, "threads": args.threads,
              "batch": args.batch, "minutes": args.minutes, "torch": torch.__version__, "evaluations": []}
    started = time.time()
    if args.phase == "verifier":
        cfg = config(VERIFIER_SHAPE, -(-vocab // 16) * 16, True, data, tied=True)
        model = new_model(cfg, args.seed)
        record["lr"] = lr = args.lr or 2e-3
        rewording = random.Random(args.seed)
        model = train(model, lambda m: ar_loss(m, data, args.batch, rewording), args.minutes, lr,
                      args.eval_minutes or 2.0, record, lambda m: verifier_scores(m, data))
        record["logit_scale"] = VERIFIER_LOGIT_SCALE
        scale_logits(model, VERIFIER_LOGIT_SCALE)
        save(model, data, args.out / "verifier", "Qwen2ForCausalLM")
    elif args.phase == "dllm-ar":
        # The verifier's vocabulary rounded up, plus 16 unused rows: Dream's is larger than Qwen2.5's too.
        cfg = config(DLLM_SHAPE, -(-vocab // 16) * 16 + 16, True, data, tied=False)
        model = new_model(cfg, args.seed + 1)
        record["lr"] = lr = args.lr or 1e-3
        model = train(model, lambda m: ar_loss(m, data, args.batch), args.minutes, lr, args.eval_minutes or 4.0, record,
                      lambda m: validate(m, data, (32,)))
        args.work.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.work / "dllm-ar.pt")
    else:
        cfg = config(DLLM_SHAPE, -(-vocab // 16) * 16 + 16, False, data, tied=False)
        model = DecoderLM(cfg, qkv_bias=True)
        model.load_state_dict(load_weights(args.out / "dllm") if args.resume else torch.load(args.work / "dllm-ar.pt"))
        # At canvas 32 only: the AR weights never end a canvas of 96 (2 minutes of validation), and a
        # resumed phase's starting weights were validated at every canvas at the end of the last one.
        record["start"] = validate(model, data, VALIDATION_CANVASES[:1])
        log(f"starting weights, bidirectional attention: validation {json.dumps(record['start'])}")
        rng = random.Random(args.seed)
        record["lr"] = lr = args.lr or 1e-3
        record["first_weight"] = args.first_weight
        model = train(model, lambda m: diffusion_loss(m, data, args.batch, rng, 0.8, args.first_weight), args.minutes,
                      lr, args.eval_minutes or 7.0, record, lambda m: validate(m, data, VALIDATION_CANVASES))
        save(model, data, args.out / "dllm", "DreamModel")
    record["seconds"] = round(time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / (args.record or f"training-{args.phase}.json")).write_text(json.dumps(record, indent=2) + "\n")
    log(f"done: {json.dumps({k: v for k, v in record.items() if k != 'evaluations'})}")


if __name__ == "__main__":
    main()
