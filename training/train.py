"""Training the router: ZOOTER reward distillation.

    targets  s*(q) from labels.py (softmax(r/tau), tag-enhanced with beta) or hard one-hots
    model    RouterModel: pretrained encoder -> mean pool -> linear head over the candidates
    loss     KL(s* || softmax(logits))
    optim    AdamW, linear warmup then linear decay, gradient clipping
    select   the checkpoint with the best DEV ROUTING REWARD (mean reward of the routed candidate),
             or, for quantization-aware heads, the head averaged over the second half of the epochs

Two loops share the helpers below: `train_head` (frozen encoder: its embeddings are computed once
and only the head trains, seconds per run) and `fine_tune` (the whole encoder). Both go through
Hugging Face accelerate, so the same code runs on one CPU or, under `accelerate launch` /
`torchrun`, on several GPUs. The run is written into RUN's partial folder (`.RUN.partial`, with
state.pt for --resume) and renamed to RUN when it ends: an interrupted run never mixes with a
finished one. Everything that can be refused is checked before that folder is made, and a run
stopped before its first epoch was saved removes it (RunFolder).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zooter.runtime.errors import UserError
from zooter.training.dataset import RoutingDataset
from zooter.training.evaluate import reward_text
from zooter.training.labels import training_targets

# Per-mode defaults; docs/training.md has the runs that chose them.
FULL = {"epochs": 3, "lr": 5e-5, "int8_consistency": 0.0}
FROZEN = {"epochs": 40, "lr": 3e-3, "int8_consistency": 200.0}
ENCODERS = ("transformer", "static")


@dataclass
class TrainConfig:
    data: str
    out: str
    dev: str | None = None              # without it, 10% of --data is held out by query hash
    backbone: str | None = None         # a local Hugging Face encoder folder; None = all-MiniLM-L6-v2
    candidates: str | None = None       # candidates.yaml: recorded so eval and export find costs
    tau: float | str = "auto"           # "auto": from the training rows' reward spread (labels.auto_tau)
    beta: float = 0.3
    loss: str = "kl"                    # "kl" (distillation) or "hard" (cross entropy on the argmax)
    epochs: int | None = None           # None: FULL or FROZEN default
    lr: float | None = None
    max_length: int = 128
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1                 # fraction of the steps
    clip: float = 1.0
    seed: int = 0
    frozen: bool = False                # train the head only, on embeddings computed once
    layers: int | None = None           # keep only the backbone's first N transformer layers (None: all)
    train_layers: int | None = None     # fine-tune only the top N transformer layers (None: all)
    cache: str | None = None            # folder caching frozen embeddings across runs
    int8_consistency: float | None = None  # None: FROZEN/FULL default; 0 turns quantization-aware training off
    threads: int | None = None          # torch CPU threads; None = torch's default
    keep_state: bool = False            # keep state.pt after the run ends (to extend it later)
    oof_folds: int = 5                  # head-only runs: folds of training rows predicted out of fold for
                                        # the decision layer (0: fit it on the dev rows alone)
    encoder: str = "transformer"        # or "static": the backbone distilled to a token table (training/static.py)

    def resolved(self) -> "TrainConfig":
        defaults = FROZEN if self.frozen else FULL
        out = TrainConfig(**asdict(self))
        out.epochs = self.epochs if self.epochs is not None else defaults["epochs"]
        out.lr = self.lr if self.lr is not None else defaults["lr"]
        out.int8_consistency = self.int8_consistency if self.int8_consistency is not None else defaults["int8_consistency"]
        if self.encoder not in ENCODERS:
            raise UserError(f"--encoder {self.encoder!r}: choose {' or '.join(ENCODERS)}")
        if self.encoder == "static":
            # A table lookup has no INT8 rounding to train against (export ships it in fp32) and no
            # layers to cut or fine-tune.
            if not self.frozen or self.layers is not None:
                raise UserError("--encoder static trains the head only, on a token table: it takes no --fine-tune, "
                                "--train-layers or --layers")
            if self.int8_consistency:
                raise UserError("--encoder static: --int8-consistency has no INT8 encoder to agree with (the static "
                                "router ships in fp32)")
            out.int8_consistency = 0.0
        if out.int8_consistency < 0:
            raise UserError(f"--int8-consistency must be >= 0, got {out.int8_consistency}")
        if out.int8_consistency > 0 and not self.frozen:
            raise UserError("--int8-consistency is for head-only runs, not --fine-tune: the INT8 encoder is built once, from the frozen encoder")
        if self.tau != "auto" and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0):
            raise UserError(f"--tau must be 'auto' or a positive number, got {self.tau!r}")
        if self.oof_folds == 1 or self.oof_folds < 0:
            raise UserError(f"--oof-folds must be 0 (dev rows only) or at least 2, got {self.oof_folds}")
        if out.backbone is None:
            from zooter.training.model import default_backbone

            out.backbone = default_backbone()
        return out


# --- data ------------------------------------------------------------------------------------
def split_dev(data: RoutingDataset, dev_path: str | None) -> tuple[RoutingDataset, RoutingDataset]:
    """(train, dev): the --dev file, else 10% of the rows held out by query hash (never by position)."""
    if dev_path:
        return data, RoutingDataset.load(dev_path, data.candidates)
    from zooter.training.splits import split_indices

    # Hash seed 1, not the data split's 0: a train file made by that split holds only hashes >= 0.2.
    parts = split_indices(data.queries, dev=0.1, test=0.0, seed=1)
    if not parts["dev"] or not parts["train"]:
        raise UserError(f"{data.path}: too few rows ({len(data)}) to hold out a dev split; pass --dev")
    return data.subset(parts["train"]), data.subset(parts["dev"])


def best_single(data: RoutingDataset) -> dict:
    means = np.nanmean(data.rewards(), axis=0)
    j = int(np.nanargmax(means))
    return {"candidate": data.candidates[j], "mean_reward": float(means[j])}


@dataclass
class Problem:
    """What training learns from: the rows, their targets and the record of where they came from."""

    train: RoutingDataset
    dev: RoutingDataset
    targets: np.ndarray                 # (train rows, labels) s*(q) or one-hots
    meta: dict                          # provenance for run.json

    @property
    def labels(self) -> list[str]:
        return self.train.candidates


def prepare(cfg: TrainConfig) -> Problem:
    """Split, temperature, targets (tag distributions from the training rows only) and provenance."""
    from zooter.training.labels import AllEqualRewards, auto_tau
    from zooter.training.splits import DIGEST_SCHEME, query_digests

    train_data, dev_data = split_dev(RoutingDataset.load(cfg.data), cfg.dev)
    rewards = train_data.rewards()
    tau = cfg.tau
    if tau == "auto":
        try:
            tau = auto_tau(rewards)
        except AllEqualRewards as err:
            raise UserError(f"{cfg.data}: --tau auto: {err}") from None
    targets, tag_dists = training_targets(rewards, [r.tags for r in train_data.rows], tau=tau, beta=cfg.beta, loss=cfg.loss)
    meta = {"data": str(cfg.data), "data_sha256": train_data.sha256(), "dev_sha256": dev_data.sha256(),
            "backbone": str(cfg.backbone), "beta": cfg.beta if cfg.loss == "kl" else 1.0, "tau": tau,
            "tau_rule": "auto" if cfg.tau == "auto" else "given",
            "loss": cfg.loss, "seed": cfg.seed, "max_length": cfg.max_length, "frozen": cfg.frozen,
            "candidates_file": cfg.candidates, "best_single": best_single(train_data),
            "n_train": len(train_data), "n_dev": len(dev_data),
            "tags": {t: int(sum(t in r.tags for r in train_data.rows)) for t in tag_dists},
            # so `zooter eval` can warn when it is given queries the router trained or chose on
            "query_digests": {"scheme": DIGEST_SCHEME, "train": query_digests(train_data.queries),
                              "dev": query_digests(dev_data.queries)},
            "config": asdict(cfg)}
    return Problem(train_data, dev_data, targets, meta)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length (sorted within chunks of 50 batches): far less padding."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def freeze_lower_layers(model, keep: int) -> None:
    """Fine-tune only the top `keep` transformer layers and the head. Backpropagation then stops at
    the lowest trained layer, which is what makes fine-tuning affordable on a CPU."""
    from zooter.training.model import transformer_layers

    n = model.encoder.config.num_hidden_layers
    stack = transformer_layers(model.encoder)
    if not 0 <= keep <= n:
        raise UserError(f"--train-layers must be between 0 and {n}, got {keep}")
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in list(stack)[n - keep:]:
        for p in layer.parameters():
            p.requires_grad_(True)


def routed_reward(rewards: np.ndarray, logits: np.ndarray) -> float:
    """Dev metric: mean reward of the argmax candidate among each row's scored candidates."""
    choice = np.argmax(np.where(np.isnan(rewards), -np.inf, logits), axis=1)
    return float(np.mean(rewards[np.arange(len(rewards)), choice]))


# --- shared by both loops ---------------------------------------------------------------------------
def partial_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def epochs_saved(folder: Path) -> str:
    """'3 epochs saved', from the curves written with each checkpoint."""
    try:
        n = len(json.loads((folder / "curves.json").read_text()))
    except (OSError, ValueError, TypeError):
        return "its last epoch saved"
    return f"{n} epoch{'s' if n != 1 else ''} saved"


def nothing_to_resume(out: str | Path) -> str:
    return (f"{out}: nothing to resume: no interrupted run saved an epoch there (a finished run keeps its state only "
            f"with --keep-state); run the same command without --resume to start")


class RunFolder:
    """RUN is written into `.RUN.partial` beside it and renamed into place when training ends.

    A new run refuses an existing RUN unless `force`, and an interrupted run that can be resumed (its
    partial folder holds state.pt, written at the end of each epoch) unless `resume` or `force`. A
    partial folder without state.pt holds nothing to resume: a new run reuses it without asking, and
    a run stopped before its first epoch was saved removes it (`abandon`). --resume continues the
    partial folder (or a finished run kept with --keep-state).
    """

    def __init__(self, out: str | Path, resume: bool = False, force: bool = False, main: bool = True):
        self.out = Path(out)
        self.work = partial_folder(self.out)
        self.state = self.work / "state.pt"
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        finished = (self.out / "run.json").is_file()
        if self.out.is_dir() and any(self.out.iterdir()) and not finished:
            raise UserError(f"{self.out}: exists and is not a zooter run; choose a new --out")
        if resume:
            source = self.resumable(self.out)
            if source is None:
                raise UserError(nothing_to_resume(self.out))
            if source == self.out and main:
                shutil.rmtree(self.work, ignore_errors=True)
                shutil.copytree(self.out, self.work)
            return
        if self.state.is_file() and not force:
            raise UserError(f"{self.work}: an interrupted run of {self.out} is there ({epochs_saved(self.work)}); pass "
                            f"--resume to continue it or --force to start over")
        if finished and not force:
            raise UserError(f"{self.out}: a trained run is already there; pass --force to replace it"
                            + (" (or --resume to continue it)" if (self.out / "state.pt").is_file() else ""))
        self.fresh = True

    def start(self, main: bool = True) -> None:
        """Create the partial folder of a new run, once everything that can be refused has been checked
        (data, backbone, flags): a refused run writes nothing."""
        if main and getattr(self, "fresh", False):
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)

    def abandon(self) -> None:
        """After an interruption or a failure: keep the partial folder when it can be resumed, else
        remove it, so that nothing asks for a --resume that has nothing to continue."""
        if not self.state.is_file():
            shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def resumable(out: str | Path) -> Path | None:
        """The folder holding the state to resume RUN from: its partial folder, else a finished RUN
        kept with --keep-state; None when there is nothing to resume."""
        out = Path(out)
        for folder in (partial_folder(out), out):
            if (folder / "state.pt").is_file() and (folder / "config.json").is_file():
                return folder
        return None

    @staticmethod
    def saved_config(out: str | Path) -> dict:
        """The config.json of the run to resume."""
        folder = RunFolder.resumable(out)
        if folder is None:
            raise UserError(nothing_to_resume(out))
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{folder / 'config.json'}: not valid JSON ({err}); the file is truncated or corrupt") from None

    def save_state(self, **state) -> None:
        import torch

        torch.save(state, self.state)

    def load_state(self) -> dict:
        import torch

        return torch.load(self.state, weights_only=False)

    def finish(self, keep_state: bool) -> dict:
        """Rename the finished run into place; returns its run.json."""
        if not keep_state:
            self.state.unlink(missing_ok=True)
        old = self.out.with_name(f".{self.out.name}.replaced")
        if self.out.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.out.rename(old)
        self.work.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        return json.loads((self.out / "run.json").read_text())


def optimizer_for(parameters, cfg: TrainConfig, total_steps: int):
    """AdamW without weight decay on biases and LayerNorm weights; linear warmup then linear decay."""
    import torch

    params = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    warmup = int(cfg.warmup * total_steps)
    schedule = lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total_steps - step) / max(total_steps - warmup, 1)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def steps_per_epoch(rows: int, cfg: TrainConfig, processes: int) -> int:
    # Every process must take the same number of steps (gradient syncs pair up): batches are dealt
    # round-robin and a remainder smaller than the process count is dropped.
    return math.ceil(rows / cfg.batch_size) // processes


@dataclass
class Progress:
    """The loop's state that a resumed run restores: epoch, curves, the best so far, the average."""

    epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"dev_reward": -math.inf, "epoch": None})
    average: dict | None = None         # summed head weights over the averaged epochs
    averaged: int = 0

    def add_to_average(self, weights: dict) -> None:
        self.average = {k: v.detach().clone() + (self.average[k] if self.average else 0) for k, v in weights.items()}
        self.averaged += 1

    def mean_weights(self) -> dict:
        return {k: v / self.averaged for k, v in self.average.items()}

    def improves(self, point: dict) -> bool:
        if point["dev_reward"] > self.best["dev_reward"]:
            self.best = {"dev_reward": point["dev_reward"], "epoch": point["epoch"]}
            return True
        return False


def run_summary(problem: Problem, best: dict) -> dict:
    """run.json's `dev` figures: the router's dev reward against the best single and the oracle."""
    dev_r = problem.dev.rewards()
    r = np.where(np.isnan(dev_r), -np.inf, dev_r)
    single = problem.meta["best_single"]["candidate"]
    return {"mean_reward": best["dev_reward"], "epoch": best["epoch"], "n": len(problem.dev),
            **{k: best[k] for k in ("averaged_epochs", "int8_agreement") if k in best},
            "oracle": float(np.mean(r.max(axis=1))),
            "best_single_from_train": float(np.nanmean(dev_r[:, problem.dev.candidates.index(single)])),
            "best_single_on_dev": best_single(problem.dev)}


def _setup(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return Accelerator(cpu=not torch.cuda.is_available()), np.random.default_rng(cfg.seed)


def _new_model(cfg: TrainConfig, problem: Problem):
    """A fresh router, cut to --layers and, when fine-tuning, frozen below --train-layers; the head's
    bias starts at the log of the mean target (the prior), so early steps learn the query rather than
    the label frequencies."""
    import torch

    from zooter.training.model import RouterModel, keep_first_layers

    if cfg.encoder == "static":
        from zooter.training.static import static_encoder

        encoder, tokenizer = static_encoder(cfg.backbone, cfg.cache)
        model = RouterModel(encoder, problem.labels)
    else:
        model, tokenizer = RouterModel.from_backbone(cfg.backbone, problem.labels)
    if cfg.layers is not None:
        keep_first_layers(model.encoder, cfg.layers)
    if cfg.train_layers is not None and not cfg.frozen:
        freeze_lower_layers(model, cfg.train_layers)
    with torch.no_grad():
        model.head.bias.copy_(torch.log(torch.tensor(problem.targets.mean(0), dtype=torch.float32).clamp(min=1e-6)))
    return model, tokenizer


def _restore(folder: RunFolder, module, optimizer, scheduler, rng) -> Progress:
    import torch

    state = folder.load_state()
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def _checkpoint(folder: RunFolder, progress: Progress, module, optimizer, scheduler, rng) -> None:
    import torch

    (folder.work / "curves.json").write_text(json.dumps(progress.history, indent=2) + "\n")
    folder.save_state(model=module.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      progress=progress, numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state())


def _report(bar, cfg: TrainConfig, point: dict) -> None:
    bar.write(f"epoch {point['epoch']}/{cfg.epochs}: train loss {point['train_loss']:.4f}, "
              f"dev routed reward {reward_text(point['dev_reward'])}"
              + (f", INT8 agreement {point['dev_int8_agreement']:.2%}" if "dev_int8_agreement" in point else ""))


def decision_layer(problem: Problem, train_x, dev_x, dev_probs, train_x_int8=None, oof_probs=None, fit_rewards=None,
                   partial=(), weights=None, estimates=None):
    """The expected-reward head and the decision settings fitted on held-out predictions
    (training/calibrate.py): ((weight, bias), router.json's decision block). `fit_rewards`: what the
    reward head regresses on when it is not the training rows' rewards (an added candidate's column
    with its unlabelled rows estimated, training/lifecycle.py); the decision layer still fits on the
    realised rewards. `partial`: the candidates labelled on some rows only, their gain imputed for the guard's
    margin where unlabelled (calibrate._margin) with `weights` ((training rows', dev rows') (rows x
    candidates) weights of their labelled rows, None: equal) and `estimates` (the same shapes: their rewards
    estimated on every row, held out where labelled; None: the gain's mean alone)."""
    from zooter.training.calibrate import (INT8_CONSISTENCY, FittingRows, choose_strength, fit_decision, inner_folds,
                                           ridge, scores)

    realised_train = problem.train.rewards()
    rewards = realised_train if fit_rewards is None else fit_rewards
    folds = inner_folds(problem.train.queries, 5)
    strength = choose_strength(train_x, rewards, folds, train_x_int8)
    head = ridge(train_x, rewards, strength, train_x_int8)
    probs, raw, realised = [dev_probs], [scores(head, dev_x)], [problem.dev.rewards()]
    if oof_probs is not None:
        oof_scores = np.zeros_like(rewards)
        for held in folds:
            rest = np.setdiff1d(np.arange(len(train_x)), held)
            fold_head = ridge(train_x[rest], rewards[rest], strength, None if train_x_int8 is None else train_x_int8[rest])
            oof_scores[held] = scores(fold_head, train_x[held])
        probs.append(oof_probs), raw.append(oof_scores), realised.append(realised_train)
    row_weights = None if weights is None else np.vstack([weights[1]] + [weights[0]] * (len(probs) - 1))
    row_estimates = None if estimates is None else np.vstack([estimates[1]] + [estimates[0]] * (len(probs) - 1))
    rows = FittingRows(np.vstack(probs), np.vstack(raw), np.vstack(realised), oof=oof_probs is not None,
                       partial=tuple(partial), weights=row_weights, estimates=row_estimates)
    decision = fit_decision(rows, problem.labels, problem.meta["best_single"]["candidate"])
    decision["fitted_on"]["ridge_strength"] = strength
    if train_x_int8 is not None:
        decision["fitted_on"]["int8_consistency"] = INT8_CONSISTENCY
    return head, decision


# --- the two loops ----------------------------------------------------------------------------------
def train(config: TrainConfig, resume: bool = False, force: bool = False) -> dict:
    """Train a router into config.out; returns the run.json it wrote."""
    cfg = config.resolved()
    accelerator, rng = _setup(cfg)
    main = accelerator.is_main_process
    folder = RunFolder(cfg.out, resume=resume, force=force, main=main)
    problem = prepare(cfg)
    model, tokenizer = _new_model(cfg, problem)   # a bad backbone, --layers or --train-layers: refused here
    folder.start(main)
    accelerator.wait_for_everyone()
    try:
        if main:
            (folder.work / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        started = time.time()
        if cfg.frozen:
            train_head(cfg, problem, model, tokenizer, folder, rng, resume, main=main)
        else:
            fine_tune(cfg, problem, model, tokenizer, folder, accelerator, rng, resume)
        accelerator.wait_for_everyone()
    except BaseException:   # Ctrl-C included
        if main:
            folder.abandon()
        raise
    if not main:
        return {}
    info = json.loads((folder.work / "run.json").read_text())
    info["train_seconds"] = round(time.time() - started, 1)
    (folder.work / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder.finish(cfg.keep_state)


def fit_head(cfg: TrainConfig, x, targets, rng, x_int8=None, after_epoch=None, restore=None, bar=None, seed=None):
    """Train a linear head on fixed embeddings (the frozen router's loop); returns (head, Progress).

    Each step: KL(s* || softmax(head(x))), and with `x_int8` the consistency term
    int8_consistency * KL(p(x) || p(x_int8)), so the head decides alike from the INT8 encoder's
    embeddings. The head kept is the average of its weights over the second half of the epochs: it
    decides more steadily under INT8 and routes better than a dev-chosen epoch (docs/training.md),
    and the dev rows then stay out of every choice, so they can fit the decision layer and be the
    export gate's rows. `after_epoch(head, point, progress, optimizer, scheduler)` sees each epoch;
    `restore(head, optimizer, scheduler) -> Progress` continues a run.
    """
    import torch
    import torch.nn.functional as F

    # Seeded here, not only at the start of the run: building the INT8 encoder (skipped when its
    # embeddings are cached) draws from torch's generator, and the head must not depend on the cache.
    torch.manual_seed(cfg.seed if seed is None else seed)
    head = torch.nn.Linear(x.shape[1], targets.shape[1])
    with torch.no_grad():
        head.bias.copy_(torch.log(targets.mean(0).clamp(min=1e-6)))
    steps = steps_per_epoch(len(x), cfg, 1)
    optimizer, scheduler = optimizer_for(head.parameters(), cfg, steps * cfg.epochs)
    progress = restore(head, optimizer, scheduler) if restore else Progress()
    for epoch in range(progress.epoch, cfg.epochs):
        head.train()
        losses = []
        for idx in length_batches(np.ones(len(x)), cfg.batch_size, rng)[:steps]:
            log_p = F.log_softmax(head(x[idx]), -1)
            loss = F.kl_div(log_p, targets[idx], reduction="batchmean")
            if x_int8 is not None:
                log_q = F.log_softmax(head(x_int8[idx]), -1)
                loss = loss + cfg.int8_consistency * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        head.eval()
        if epoch >= cfg.epochs // 2:
            progress.add_to_average(head.state_dict())
        progress.epoch = epoch + 1
        point = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": float(scheduler.get_last_lr()[0])}
        if after_epoch is not None:
            after_epoch(head, point, progress, optimizer, scheduler)
    head.load_state_dict(progress.mean_weights())
    return head, progress


def train_head(cfg: TrainConfig, problem: Problem, model, tokenizer, folder: RunFolder, rng, resume: bool,
               main: bool = True) -> None:
    """Frozen encoder: embed every query once, train the head (fit_head), fit the decision layer on
    held-out predictions (the dev rows and, with oof_folds, every training row predicted by heads
    trained without it), write the run. Runs in one process: a linear head gains nothing from more."""
    import torch
    from tqdm.auto import tqdm

    from zooter.convert.int8_encoder import Int8Encoder
    from zooter.runtime.decision import softmax
    from zooter.training.calibrate import inner_folds
    from zooter.training.embed import embed_texts

    queries, dev_queries = problem.train.queries, problem.dev.queries
    train_x = torch.tensor(embed_texts(model, tokenizer, queries, cfg.max_length, cache=cfg.cache, progress="embedding train"))
    dev_x = torch.tensor(embed_texts(model, tokenizer, dev_queries, cfg.max_length, cache=cfg.cache, progress="embedding dev"))
    train_q = dev_q = None
    if cfg.int8_consistency:  # one call: the INT8 encoder is built once for train and dev
        both = torch.tensor(embed_texts(model, tokenizer, queries + dev_queries, cfg.max_length, cache=cfg.cache,
                                        progress="int8 embedding", int8=Int8Encoder()))
        train_q, dev_q = both[:len(queries)], both[len(queries):]
    # A (hidden x labels) head gains nothing from threads, and OpenMP threads waiting for each other
    # on a shared CPU make its steps far slower (docs/training.md): one thread unless asked.
    threads_before = torch.get_num_threads()
    if not cfg.threads:
        torch.set_num_threads(1)
    targets = torch.tensor(problem.targets, dtype=torch.float32)
    dev_rewards = problem.dev.rewards()
    started = time.time()
    steps = steps_per_epoch(len(queries), cfg, 1)

    def after_epoch(head, point, progress, optimizer, scheduler):
        with torch.no_grad():
            logits = head(dev_x).numpy()
            point["dev_reward"] = routed_reward(dev_rewards, logits)
            if dev_q is not None:
                point["dev_int8_agreement"] = float(np.mean(head(dev_q).numpy().argmax(1) == logits.argmax(1)))
        point["seconds"] = round(time.time() - started, 1)
        progress.history.append(point)
        if main:
            if point["epoch"] % 10 == 0 or point["epoch"] == cfg.epochs:   # a frozen epoch takes a second
                _report(bar, cfg, point)
            _checkpoint(folder, progress, head, optimizer, scheduler, rng)

    bar = tqdm(total=steps * cfg.epochs, desc="train", mininterval=1.0, disable=not main)
    restore = (lambda head, optimizer, scheduler: _restore(folder, head, optimizer, scheduler, rng)) if resume else None
    head, progress = fit_head(cfg, train_x, targets, rng, train_q, after_epoch, restore, bar)
    bar.close()
    model.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        logits = head(dev_x).numpy()
        best = {"dev_reward": routed_reward(dev_rewards, logits), "epoch": None,
                "averaged_epochs": [cfg.epochs // 2 + 1, cfg.epochs]}
        if dev_q is not None:
            best["int8_agreement"] = float(np.mean(head(dev_q).numpy().argmax(1) == logits.argmax(1)))
    if main:
        print(f"head averaged over epochs {cfg.epochs // 2 + 1}-{cfg.epochs}: dev routed reward {reward_text(best['dev_reward'])}"
              + (f", INT8 agreement {best['int8_agreement']:.2%}" if "int8_agreement" in best else ""), flush=True)

    oof = None
    if cfg.oof_folds:
        oof = np.zeros(problem.targets.shape)
        folds = inner_folds(queries, cfg.oof_folds)
        for k, held in enumerate(tqdm(folds, desc="out-of-fold heads", disable=not main, leave=False)):
            rest = np.setdiff1d(np.arange(len(queries)), held)
            fold_head, _ = fit_head(cfg, train_x[rest], targets[rest], np.random.default_rng(cfg.seed + 1 + k),
                                    None if train_q is None else train_q[rest], seed=cfg.seed + 1 + k)
            with torch.no_grad():
                oof[held] = softmax(fold_head(train_x[held]).numpy())
    reward_head, decision = decision_layer(problem, train_x.numpy(), dev_x.numpy(), softmax(logits),
                                           None if train_q is None else train_q.numpy(), oof)
    model.set_reward_head(*reward_head)
    torch.set_num_threads(threads_before)
    if main:
        model.save(folder.work, tokenizer, dict(problem.meta, dev=run_summary(problem, best), curves=progress.history,
                                                decision=decision))


def fine_tune(cfg: TrainConfig, problem: Problem, model, tokenizer, folder: RunFolder, accelerator, rng,
              resume: bool) -> None:
    """The whole encoder (or its top --train-layers layers) trains with the head; the epoch with the
    best dev routed reward is kept (written as it is found, so a resumed run keeps it). The decision
    layer is then fitted on the kept model's embeddings, with the dev rows as its held-out rows
    (out-of-fold heads would mean fine-tuning the encoder again per fold)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from zooter.training.embed import in_length_order
    from zooter.training.model import RouterModel

    queries = problem.train.queries
    lengths = np.array([len(ids) for ids in tokenizer(queries, truncation=True, max_length=cfg.max_length)["input_ids"]])
    targets = torch.tensor(problem.targets, dtype=torch.float32)
    dev_rewards = problem.dev.rewards()
    steps = steps_per_epoch(len(queries), cfg, accelerator.num_processes)
    optimizer, scheduler = optimizer_for(model.parameters(), cfg, steps * cfg.epochs)
    trained, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = (_restore(folder, accelerator.unwrap_model(trained), optimizer, scheduler, rng) if resume
                else Progress())

    started = time.time()
    bar = tqdm(total=steps * cfg.epochs, initial=progress.epoch * steps, desc="train", mininterval=1.0,
               disable=not accelerator.is_main_process)
    for epoch in range(progress.epoch, cfg.epochs):
        trained.train()
        batches = length_batches(lengths, cfg.batch_size, rng)
        losses = []
        for idx in batches[accelerator.process_index::accelerator.num_processes][:steps]:
            enc = tokenizer([queries[i] for i in idx], truncation=True, max_length=cfg.max_length,
                            padding=True, return_tensors="pt").to(accelerator.device)
            log_p = F.log_softmax(trained(**enc)["logits"].float(), -1)
            loss = F.kl_div(log_p, targets[idx].to(accelerator.device), reduction="batchmean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trained.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)

        inner = accelerator.unwrap_model(trained).eval()
        logits = in_length_order(problem.dev.queries, tokenizer, cfg.max_length, 64, lambda enc: inner(**enc)["logits"],
                                 device=accelerator.device, progress="dev" if accelerator.is_main_process else None)
        point = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_reward": routed_reward(dev_rewards, logits),
                 "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.time() - started, 1)}
        progress.history.append(point)
        progress.epoch = epoch + 1
        if accelerator.is_main_process:
            _report(bar, cfg, point)
            if progress.improves(point):
                inner.save(folder.work, tokenizer, dict(problem.meta, dev=run_summary(problem, progress.best),
                                                        curves=progress.history))
            _checkpoint(folder, progress, inner, optimizer, scheduler, rng)
        accelerator.wait_for_everyone()
    bar.close()
    if not accelerator.is_main_process:
        return
    kept, _, info = RouterModel.load(folder.work)
    embed = lambda texts, name: in_length_order(texts, tokenizer, cfg.max_length, 64, lambda enc: kept.embed(**enc),
                                                progress=name)
    dev_x = embed(problem.dev.queries, "embedding dev")
    with torch.no_grad():
        from zooter.runtime.decision import softmax

        dev_probs = softmax(kept.head(torch.from_numpy(dev_x)).numpy())
    reward_head, decision = decision_layer(problem, embed(queries, "embedding train"), dev_x, dev_probs)
    kept.set_reward_head(*reward_head)
    kept.save_head(folder.work, dict(info, curves=progress.history, decision=decision))
