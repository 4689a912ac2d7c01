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
finished one.
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
from zooter.training.labels import training_targets

# Per-mode defaults; docs/training.md has the runs that chose them.
FULL = {"epochs": 3, "lr": 5e-5, "int8_consistency": 0.0}
FROZEN = {"epochs": 40, "lr": 3e-3, "int8_consistency": 200.0}


@dataclass
class TrainConfig:
    data: str
    out: str
    dev: str | None = None              # without it, 10% of --data is held out by query hash
    backbone: str | None = None         # a local Hugging Face encoder folder; None = all-MiniLM-L6-v2
    candidates: str | None = None       # candidates.yaml: recorded so eval and export find costs
    tau: float = 1.0
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

    def resolved(self) -> "TrainConfig":
        defaults = FROZEN if self.frozen else FULL
        out = TrainConfig(**asdict(self))
        out.epochs = self.epochs if self.epochs is not None else defaults["epochs"]
        out.lr = self.lr if self.lr is not None else defaults["lr"]
        out.int8_consistency = self.int8_consistency if self.int8_consistency is not None else defaults["int8_consistency"]
        if out.int8_consistency < 0:
            raise UserError(f"--int8-consistency must be >= 0, got {out.int8_consistency}")
        if out.int8_consistency > 0 and not self.frozen:
            raise UserError("--int8-consistency needs --frozen: the INT8 encoder is built once, from the frozen encoder")
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
    """Split, targets (tag distributions from the training rows only) and provenance."""
    train_data, dev_data = split_dev(RoutingDataset.load(cfg.data), cfg.dev)
    targets, tag_dists = training_targets(train_data.rewards(), [r.tags for r in train_data.rows],
                                          tau=cfg.tau, beta=cfg.beta, loss=cfg.loss)
    meta = {"data": str(cfg.data), "data_sha256": train_data.sha256(), "dev_sha256": dev_data.sha256(),
            "backbone": str(cfg.backbone), "beta": cfg.beta if cfg.loss == "kl" else 1.0, "tau": cfg.tau,
            "loss": cfg.loss, "seed": cfg.seed, "max_length": cfg.max_length, "frozen": cfg.frozen,
            "candidates_file": cfg.candidates, "best_single": best_single(train_data),
            "n_train": len(train_data), "n_dev": len(dev_data),
            "tags": {t: int(sum(t in r.tags for r in train_data.rows)) for t in tag_dists},
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
class RunFolder:
    """RUN is written into `.RUN.partial` beside it and renamed into place when training ends.

    A new run refuses an existing RUN unless `force`, and an interrupted one unless `resume` or
    `force`; --resume continues the partial folder (or a finished run kept with --keep-state).
    """

    def __init__(self, out: str | Path, resume: bool = False, force: bool = False, main: bool = True):
        self.out = Path(out)
        self.work = self.out.with_name(f".{self.out.name}.partial")
        self.state = self.work / "state.pt"
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        finished = (self.out / "run.json").is_file()
        if self.out.is_dir() and any(self.out.iterdir()) and not finished:
            raise UserError(f"{self.out}: exists and is not a zooter run; choose a new --out")
        if resume:
            if not self.state.is_file():
                if not (self.out / "state.pt").is_file():
                    raise UserError(f"{self.out}: nothing to resume (no state.pt; a finished run keeps it only "
                                    f"with --keep-state)")
                if main:
                    shutil.rmtree(self.work, ignore_errors=True)
                    shutil.copytree(self.out, self.work)
            return
        if self.work.exists() and not force:
            raise UserError(f"{self.work}: an interrupted run of {self.out} is there; pass --resume to continue "
                            f"it or --force to start over")
        if finished and not force:
            raise UserError(f"{self.out}: a trained run is already there; pass --force to replace it "
                            f"(or --resume to continue it)")
        self.fresh = True

    def start(self, main: bool = True) -> None:
        """Create the partial folder of a new run (after the data has been read without error)."""
        if main and getattr(self, "fresh", False):
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)

    @staticmethod
    def saved_config(out: str | Path) -> dict:
        """The config.json of the run to resume (its partial folder first)."""
        out = Path(out)
        for folder in (out.with_name(f".{out.name}.partial"), out):
            if (folder / "config.json").is_file():
                return json.loads((folder / "config.json").read_text())
        raise UserError(f"{out}: nothing to resume (no config.json)")

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
    """A fresh router; the head's bias starts at the log of the mean target (the prior), so early
    steps learn the query rather than the label frequencies."""
    import torch

    from zooter.training.model import RouterModel, keep_first_layers

    model, tokenizer = RouterModel.from_backbone(cfg.backbone, problem.labels)
    if cfg.layers is not None:
        keep_first_layers(model.encoder, cfg.layers)
    with torch.no_grad():
        model.head.bias.copy_(torch.log(torch.tensor(problem.targets.mean(0), dtype=torch.float32).clamp(min=1e-6)))
    return model, tokenizer


def _restore(folder: RunFolder, trained, optimizer, scheduler, rng, accelerator) -> Progress:
    import torch

    state = folder.load_state()
    accelerator.unwrap_model(trained).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def _checkpoint(folder: RunFolder, progress: Progress, trained, optimizer, scheduler, rng, accelerator) -> None:
    import torch

    (folder.work / "curves.json").write_text(json.dumps(progress.history, indent=2) + "\n")
    folder.save_state(model=accelerator.unwrap_model(trained).state_dict(), optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), progress=progress, numpy_rng=rng.bit_generator.state,
                      torch_rng=torch.get_rng_state())


def _report(bar, cfg: TrainConfig, point: dict) -> None:
    bar.write(f"epoch {point['epoch']}/{cfg.epochs}: train loss {point['train_loss']:.4f}, "
              f"dev routed reward {point['dev_reward']:.4f}"
              + (f", INT8 agreement {point['dev_int8_agreement']:.2%}" if "dev_int8_agreement" in point else ""))


# --- the two loops ----------------------------------------------------------------------------------
def train(config: TrainConfig, resume: bool = False, force: bool = False, int8_embedder=None) -> dict:
    """Train a router into config.out; returns the run.json it wrote.

    `int8_embedder` (zooter.export.int8_encoder.Int8Embedder) is needed for quantization-aware head
    training (--frozen with --int8-consistency > 0): the CLI hands it in.
    """
    cfg = config.resolved()
    if cfg.frozen and cfg.int8_consistency and int8_embedder is None:
        raise UserError("quantization-aware training (--int8-consistency > 0) needs the INT8 encoder of "
                        "zooter.export.int8_encoder: pass int8_embedder=Int8Embedder()")
    accelerator, rng = _setup(cfg)
    folder = RunFolder(cfg.out, resume=resume, force=force, main=accelerator.is_main_process)
    problem = prepare(cfg)
    folder.start(accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder.work / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    started = time.time()
    loop = train_head if cfg.frozen else fine_tune
    loop(cfg, problem, folder, accelerator, rng, resume, int8_embedder)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    info = json.loads((folder.work / "run.json").read_text())
    info["train_seconds"] = round(time.time() - started, 1)
    (folder.work / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder.finish(cfg.keep_state)


def train_head(cfg: TrainConfig, problem: Problem, folder: RunFolder, accelerator, rng, resume: bool,
               int8_embedder=None) -> None:
    """Frozen encoder: embed every query once, then train the head on the embeddings.

    Quantization-aware (int8_consistency > 0): the head also sees the INT8 encoder's embeddings and
    learns to decide alike from both; it keeps its weights averaged over the second half of the
    epochs instead of a dev-chosen epoch, so the dev rows play no part in the choice and export's
    parity gate on them stays a fair check (docs/training.md).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from zooter.training.embed import embed_texts

    model, tokenizer = _new_model(cfg, problem)
    queries, dev_queries = problem.train.queries, problem.dev.queries
    train_x = torch.tensor(embed_texts(model, tokenizer, queries, cfg.max_length, cache=cfg.cache, progress="embedding train"))
    dev_x = torch.tensor(embed_texts(model, tokenizer, dev_queries, cfg.max_length, cache=cfg.cache, progress="embedding dev"))
    aware = cfg.int8_consistency > 0
    if aware:  # one call: the INT8 encoder is built once for train and dev
        both = torch.tensor(embed_texts(model, tokenizer, queries + dev_queries, cfg.max_length, cache=cfg.cache,
                                        progress="int8 embedding", int8=int8_embedder))
        train_q, dev_q = both[:len(queries)], both[len(queries):]
    # A (hidden x labels) head gains nothing from threads, and OpenMP threads waiting for each other
    # on a shared CPU make its steps far slower (docs/training.md): one thread unless asked.
    threads_before = torch.get_num_threads()
    if not cfg.threads:
        torch.set_num_threads(1)
    targets = torch.tensor(problem.targets, dtype=torch.float32)
    dev_rewards = problem.dev.rewards()
    steps = steps_per_epoch(len(queries), cfg, accelerator.num_processes)
    head = model.head
    optimizer, scheduler = optimizer_for(head.parameters(), cfg, steps * cfg.epochs)
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    progress = _restore(folder, head, optimizer, scheduler, rng, accelerator) if resume else Progress()
    average_from = cfg.epochs // 2

    def dev_logits(x):
        with torch.no_grad():
            return accelerator.unwrap_model(head)(x.to(accelerator.device)).float().cpu().numpy()

    started = time.time()
    bar = tqdm(total=steps * cfg.epochs, initial=progress.epoch * steps, desc="train", mininterval=1.0,
               disable=not accelerator.is_main_process)
    for epoch in range(progress.epoch, cfg.epochs):
        head.train()
        batches = length_batches(np.ones(len(queries)), cfg.batch_size, rng)
        losses = []
        for idx in batches[accelerator.process_index::accelerator.num_processes][:steps]:
            log_p = F.log_softmax(head(train_x[idx].to(accelerator.device)).float(), -1)
            loss = F.kl_div(log_p, targets[idx].to(accelerator.device), reduction="batchmean")
            if aware:  # decide alike from the INT8 encoder's embedding: KL(p || p_int8), both through the head
                log_q = F.log_softmax(head(train_q[idx].to(accelerator.device)).float(), -1)
                loss = loss + cfg.int8_consistency * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(head.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)

        head.eval()
        logits = dev_logits(dev_x)
        point = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_reward": routed_reward(dev_rewards, logits),
                 "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.time() - started, 1)}
        if aware:
            point["dev_int8_agreement"] = float(np.mean(dev_logits(dev_q).argmax(1) == logits.argmax(1)))
            if epoch >= average_from:
                progress.add_to_average(accelerator.unwrap_model(head).state_dict())
        elif progress.improves(point):
            progress.best["weights"] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(head).state_dict().items()}
        progress.history.append(point)
        progress.epoch = epoch + 1
        if accelerator.is_main_process:
            if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs:   # a frozen epoch takes a second
                _report(bar, cfg, point)
            _checkpoint(folder, progress, head, optimizer, scheduler, rng, accelerator)
        accelerator.wait_for_everyone()
    bar.close()
    torch.set_num_threads(threads_before)
    if not accelerator.is_main_process:
        return
    inner = accelerator.unwrap_model(head)
    if aware:
        inner.load_state_dict(progress.mean_weights())
        logits = dev_logits(dev_x)
        agreement = float(np.mean(dev_logits(dev_q).argmax(1) == logits.argmax(1)))
        best = {"dev_reward": routed_reward(dev_rewards, logits), "epoch": None,
                "averaged_epochs": [average_from + 1, cfg.epochs], "int8_agreement": agreement}
        print(f"head averaged over epochs {average_from + 1}-{cfg.epochs}: dev routed reward {best['dev_reward']:.4f}, "
              f"INT8 agreement {agreement:.2%}", flush=True)
    else:
        inner.load_state_dict(progress.best.pop("weights"))
        best = progress.best
    model.save(folder.work, tokenizer, dict(problem.meta, dev=run_summary(problem, best), curves=progress.history))


def fine_tune(cfg: TrainConfig, problem: Problem, folder: RunFolder, accelerator, rng, resume: bool,
              int8_embedder=None) -> None:
    """The whole encoder (or its top --train-layers layers) trains with the head; the epoch with the
    best dev routed reward is kept (written as it is found, so a resumed run keeps it)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from zooter.training.embed import in_length_order

    model, tokenizer = _new_model(cfg, problem)
    if cfg.train_layers is not None:
        freeze_lower_layers(model, cfg.train_layers)
    queries = problem.train.queries
    lengths = np.array([len(ids) for ids in tokenizer(queries, truncation=True, max_length=cfg.max_length)["input_ids"]])
    targets = torch.tensor(problem.targets, dtype=torch.float32)
    dev_rewards = problem.dev.rewards()
    steps = steps_per_epoch(len(queries), cfg, accelerator.num_processes)
    optimizer, scheduler = optimizer_for(model.parameters(), cfg, steps * cfg.epochs)
    trained, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = _restore(folder, trained, optimizer, scheduler, rng, accelerator) if resume else Progress()

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
            _checkpoint(folder, progress, trained, optimizer, scheduler, rng, accelerator)
        accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process:  # the kept checkpoint's run.json gets the whole curve
        info = json.loads((folder.work / "run.json").read_text())
        info["curves"] = progress.history
        (folder.work / "run.json").write_text(json.dumps(info, indent=2) + "\n")
