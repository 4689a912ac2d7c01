"""Training the router: ZOOTER reward distillation in one readable loop.

    targets  s*(q) from labels.py (softmax(r/tau), tag-enhanced with beta) or hard one-hots
    model    RouterModel: pretrained encoder -> mean pool -> linear head over the candidates
    loss     KL(s* || softmax(logits))
    optim    AdamW, linear warmup then linear decay, gradient clipping
    select   the checkpoint with the best DEV ROUTING REWARD (mean reward of the routed candidate)

Two modes: full fine-tuning, and `frozen` (the encoder's embeddings are computed once and only the
head trains: seconds per run, for fast iteration). The loop goes through Hugging Face accelerate,
so the same code runs on one CPU or, under `accelerate launch` / `torchrun`, on several GPUs.
A run folder is RouterModel's format plus config.json, curves.json and, while training, state.pt
(for --resume).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zooter.errors import UserError
from zooter.export.quantize import INT8_RECIPE, cpu_int8_config
from zooter.training.dataset import RoutingDataset
from zooter.training.labels import training_targets

# Defaults measured on 2 CPU cores with all-MiniLM-L6-v2 on dcrouter (docs/training.md).
# int8_consistency: weight of KL(p(e) || p(e_int8)) (training/quantized.py); 200 measured on dcrouter:
# the INT8 bundle agrees with PyTorch on 99% of dev decisions at an unchanged dev routed reward.
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


def in_length_order(texts: Sequence[str], tokenizer, max_length: int, batch_size: int, fn: Callable, device="cpu",
                    progress: str | None = None) -> np.ndarray:
    """fn(tokenized batch) -> (batch, k) tensor over all texts, batched by length; rows in input order."""
    import torch
    from tqdm.auto import tqdm

    lengths = np.array([len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    out = None
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
            values = fn(enc).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), values.shape[1]), dtype=np.float32)
            out[idx] = values
    return out


def embed_texts(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
                cache: str | Path | None = None, progress: str | None = "embedding", int8: bool = False) -> np.ndarray:
    """The router's pooled encoder embeddings (the head's input); with `int8`, those of the INT8
    encoder that export will build (training/quantized.py).

    With a cache folder, vectors are kept per query text (one .npz per encoder and max_length), so
    folds, splits and variants that share queries embed each query once.
    """
    texts = list(texts)

    def compute(some: list[str]) -> np.ndarray:
        model.eval()
        if int8:
            from zooter.training.quantized import int8_embed

            return int8_embed(model, tokenizer, some, max_length, progress=progress)
        return in_length_order(some, tokenizer, max_length, batch_size, lambda enc: model.embed(**enc), progress=progress)

    if not cache:
        return compute(texts)
    depth = model.encoder.config.num_hidden_layers
    key = [str(model.encoder.name_or_path), max_length, depth]
    if int8:  # the INT8 encoder also depends on the quantization recipe and this CPU's int8 config
        key += [INT8_RECIPE, cpu_int8_config(), "one query per call"]
    encoder_key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = Path(cache) / f"embeddings-{encoder_key}.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        saved = np.load(path)
        known = dict(zip(saved["keys"].tolist(), saved["vectors"]))
    keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if missing:
        fresh = compute([texts[i] for i in missing])
        known.update({keys[i]: v for i, v in zip(missing, fresh)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # processes of one launch write apart
        np.savez(tmp, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        tmp.replace(path)
    return np.stack([known[k] for k in keys]).astype(np.float32)


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


# --- the loop ------------------------------------------------------------------------------------
def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train a router into config.out; returns the run.json it wrote."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from zooter.training.model import RouterModel, keep_first_layers

    cfg = config.resolved()
    out = Path(cfg.out)
    state_path = out / "state.pt"
    if resume and not state_path.is_file():
        raise UserError(f"{out}: nothing to resume (no state.pt; a finished run keeps it only with --keep-state)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    started = time.time()

    # Data and targets. Tag distributions come from the training rows only.
    train_data, dev_data = split_dev(RoutingDataset.load(cfg.data), cfg.dev)
    labels = train_data.candidates
    rewards, dev_rewards = train_data.rewards(), dev_data.rewards()
    targets, tag_dists = training_targets(rewards, [r.tags for r in train_data.rows], tau=cfg.tau, beta=cfg.beta, loss=cfg.loss)
    targets = torch.tensor(targets, dtype=torch.float32)

    # Model. The head's bias starts at the log of the mean target: the prior, so early steps learn the query.
    model, tokenizer = RouterModel.from_backbone(cfg.backbone, labels)
    if cfg.layers is not None:
        keep_first_layers(model.encoder, cfg.layers)
    with torch.no_grad():
        model.head.bias.copy_(torch.log(targets.mean(0).clamp(min=1e-6)))
    queries = train_data.queries
    if cfg.frozen:
        train_x = torch.tensor(embed_texts(model, tokenizer, queries, cfg.max_length, cache=cfg.cache, progress="embedding train"))
        dev_x = embed_texts(model, tokenizer, dev_data.queries, cfg.max_length, cache=cfg.cache, progress="embedding dev")
        if cfg.int8_consistency:  # one call: the INT8 encoder is built once for train and dev
            both = embed_texts(model, tokenizer, list(queries) + list(dev_data.queries), cfg.max_length,
                               cache=cfg.cache, progress="int8 embedding", int8=True)
            train_q, dev_q = torch.tensor(both[:len(queries)]), both[len(queries):]
        lengths = np.ones(len(queries))
        trained = model.head
        # A (hidden x labels) head gains nothing from threads, and on a shared CPU OpenMP threads
        # waiting for each other made head steps 30x slower (measured): one thread for the head loop.
        threads_before = torch.get_num_threads()
        if not cfg.threads:
            torch.set_num_threads(1)
    else:
        lengths = np.array([len(ids) for ids in tokenizer(queries, truncation=True, max_length=cfg.max_length)["input_ids"]])
        trained = model
        if cfg.train_layers is not None:
            freeze_lower_layers(model, cfg.train_layers)

    # AdamW without weight decay on biases and LayerNorm weights; linear warmup then linear decay.
    params = [p for p in trained.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # Every process must take the same number of steps (gradient syncs pair up): the batches are dealt
    # round-robin and a remainder smaller than the process count is dropped.
    steps_per_epoch = math.ceil(len(queries) / cfg.batch_size) // accelerator.num_processes
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup * total)
    schedule = lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total - step) / max(total - warmup, 1)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    trained, optimizer, scheduler = accelerator.prepare(trained, optimizer, scheduler)

    start_epoch, history, best = 0, [], {"dev_reward": -math.inf, "epoch": None}
    # Quantization-aware runs keep the average of the head's weights over the second half of the
    # epochs instead of choosing an epoch: on dcrouter the average both steadied the INT8 decisions
    # (5-fold pooled agreement 97.5% -> 98.6% in a proxy; the demo router 99.43% dev, 99.82% held out)
    # and routed better in CV (docs/training.md), and the dev rows stay out of the choice, so the
    # export gate on them is a real check.
    averaging = cfg.frozen and cfg.int8_consistency > 0
    average_from = cfg.epochs // 2
    head_sum, n_sum = None, 0
    if resume:
        state = torch.load(state_path, weights_only=False)
        accelerator.unwrap_model(trained).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        head_sum, n_sum = state.get("head_sum"), state.get("n_sum", 0)
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])

    def dev_logits(x=None) -> np.ndarray:
        inner = accelerator.unwrap_model(trained)
        inner.eval()
        if cfg.frozen:
            with torch.no_grad():
                return inner(torch.tensor(dev_x if x is None else x, device=accelerator.device)).float().cpu().numpy()
        return in_length_order(dev_data.queries, tokenizer, cfg.max_length, 64, lambda enc: inner(**enc)["logits"],
                               device=accelerator.device, progress="dev" if accelerator.is_main_process else None)

    meta = {"data": str(cfg.data), "data_sha256": train_data.sha256(), "dev_sha256": dev_data.sha256(),
            "backbone": str(cfg.backbone), "beta": cfg.beta if cfg.loss == "kl" else 1.0, "tau": cfg.tau,
            "loss": cfg.loss, "seed": cfg.seed, "max_length": cfg.max_length, "frozen": cfg.frozen,
            "candidates_file": cfg.candidates, "best_single": best_single(train_data),
            "n_train": len(train_data), "n_dev": len(dev_data),
            "tags": {t: int(sum(t in r.tags for r in train_data.rows)) for t in tag_dists},
            "config": asdict(cfg)}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    saved_once = False
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train", mininterval=1.0,
               disable=not accelerator.is_main_process)
    for epoch in range(start_epoch, cfg.epochs):
        trained.train()
        if cfg.frozen:
            model.encoder.eval()
        batches = length_batches(lengths, cfg.batch_size, rng)
        mine = batches[accelerator.process_index::accelerator.num_processes][:steps_per_epoch]
        losses = []
        for idx in mine:
            if cfg.frozen:
                logits = trained(train_x[idx].to(accelerator.device))
            else:
                enc = tokenizer([queries[i] for i in idx], truncation=True, max_length=cfg.max_length,
                                padding=True, return_tensors="pt").to(accelerator.device)
                logits = trained(**enc)["logits"]
            log_p = F.log_softmax(logits.float(), -1)
            loss = F.kl_div(log_p, targets[idx].to(accelerator.device), reduction="batchmean")
            if cfg.frozen and cfg.int8_consistency:
                # Decide alike from the INT8 encoder's embedding: KL(p || p_int8), both through the head.
                log_q = F.log_softmax(trained(train_q[idx].to(accelerator.device)).float(), -1)
                loss = loss + cfg.int8_consistency * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trained.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)

        if averaging and epoch >= average_from:
            weights = accelerator.unwrap_model(trained).state_dict()
            head_sum = {k: v.detach().clone() + (head_sum[k] if head_sum else 0) for k, v in weights.items()}
            n_sum += 1
        # Select by what routing is for: the dev reward of the routed candidate, not the dev loss.
        logits = dev_logits()
        point = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_reward": routed_reward(dev_rewards, logits),
                 "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.time() - started, 1)}
        if cfg.frozen and cfg.int8_consistency:
            point["dev_int8_agreement"] = float(np.mean(dev_logits(dev_q).argmax(1) == logits.argmax(1)))
        history.append(point)
        if accelerator.is_main_process:
            if not cfg.frozen or (epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs:  # frozen epochs take a second
                bar.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {point['train_loss']:.4f}, "
                          f"dev routed reward {point['dev_reward']:.4f}"
                          + (f", INT8 agreement {point['dev_int8_agreement']:.2%}" if "dev_int8_agreement" in point else ""))
            if not averaging and point["dev_reward"] > best["dev_reward"]:
                best = {"dev_reward": point["dev_reward"], "epoch": epoch + 1}
                # A frozen encoder never changes: write it once, then only the head and run.json.
                _save(accelerator.unwrap_model(trained) if not cfg.frozen else model, tokenizer, out, meta, history, best,
                      dev_rewards, dev_data, head_only=cfg.frozen and saved_once)
                saved_once = True
            (out / "curves.json").write_text(json.dumps(history, indent=2) + "\n")
            torch.save({"epoch": epoch + 1, "model": accelerator.unwrap_model(trained).state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                        "best": best, "head_sum": head_sum, "n_sum": n_sum,
                        "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, state_path)
        accelerator.wait_for_everyone()
    bar.close()
    if averaging and accelerator.is_main_process:
        head = accelerator.unwrap_model(trained)
        head.load_state_dict({k: v / n_sum for k, v in head_sum.items()})
        logits = dev_logits()
        agreement = float(np.mean(dev_logits(dev_q).argmax(1) == logits.argmax(1)))
        best = {"dev_reward": routed_reward(dev_rewards, logits), "epoch": None,
                "averaged_epochs": [average_from + 1, cfg.epochs], "int8_agreement": agreement}
        print(f"head averaged over epochs {average_from + 1}-{cfg.epochs}: dev routed reward {best['dev_reward']:.4f}, "
              f"INT8 agreement {agreement:.2%}", flush=True)
        _save(model, tokenizer, out, meta, history, best, dev_rewards, dev_data)
    accelerator.wait_for_everyone()
    if cfg.frozen:
        torch.set_num_threads(threads_before)

    info = json.loads((out / "run.json").read_text())
    info["curves"] = history
    info["train_seconds"] = round(time.time() - started, 1)
    if accelerator.is_main_process:
        (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        if not cfg.keep_state:
            state_path.unlink(missing_ok=True)
    return info


def _save(model, tokenizer, out: Path, meta: dict, history: list, best: dict, dev_rewards: np.ndarray, dev_data,
          head_only: bool = False) -> None:
    dev_best = best_single(dev_data)
    r = np.where(np.isnan(dev_rewards), -np.inf, dev_rewards)
    dev = {"mean_reward": best["dev_reward"], "epoch": best["epoch"], "n": len(dev_data),
           **{k: best[k] for k in ("averaged_epochs", "int8_agreement") if k in best},
           "oracle": float(np.mean(r.max(axis=1))),
           "best_single_from_train": float(np.nanmean(dev_data.rewards()[:, dev_data.candidates.index(meta["best_single"]["candidate"])])),
           "best_single_on_dev": dev_best}
    if head_only:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, out / "head.safetensors")
        info = json.loads((out / "run.json").read_text())
        info.update(meta, dev=dev, curves=history)
        (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        return
    model.save(out, tokenizer, dict(meta, dev=dev, curves=history))
