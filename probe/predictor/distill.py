"""Distillation of lookahead predictors: online (streaming) and offline (recorded samples).

Shape legend: T tokens, N sampled tokens, L MoE layers, D model width, E experts.

The loss is the cross-entropy of the predictor's distribution against the true router's
probabilities (soft targets): -sum_e softmax(true_logits / tau)_e * log_softmax(pred / tau)_e,
mean over tokens (tau = 1 by default). Only the residual MLP (W1, W2) trains; the router clone
stays frozen. Each layer has its own optimizer, so a layer's update never moves another's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from probe.predictor.model import LookaheadPredictor, PredictorSet

__all__ = ["OnlineDistiller", "distill_loss", "topk_margin_loss", "train_offline"]


def distill_loss(pred_logits: torch.Tensor, true_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy, mean over tokens. Both [T, E]."""
    target = F.softmax(true_logits.float() / temperature, dim=-1)
    logp = F.log_softmax(pred_logits.float() / temperature, dim=-1)
    return -(target * logp).sum(dim=-1).mean()


def topk_margin_loss(pred_logits: torch.Tensor, true_logits: torch.Tensor, k: int,
                     margin: float = 1.0) -> torch.Tensor:
    """Hinge on the true top-k set, mean over tokens and its k members. Both [T, E].

    For each expert i of the true top-k: relu(margin - (pred_i - max_{j not in top-k} pred_j)),
    so the loss is 0 once every true top-k expert's predicted logit beats the best other
    expert's by `margin` (then the predicted top-k is exactly the true set).
    """
    if not isinstance(k, int) or not 0 < k < pred_logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, {pred_logits.shape[-1] - 1}], got {k!r}")
    pred = pred_logits.float()
    top = torch.topk(true_logits.float(), k, dim=-1).indices  # [T, k]
    in_top = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, top, True)  # [T, E]
    best_other = pred.masked_fill(in_top, float("-inf")).amax(dim=-1, keepdim=True)  # [T, 1]
    gap = pred.gather(1, top) - best_other  # [T, k]
    return F.relu(margin - gap).mean()


class OnlineDistiller:
    """Streaming trainer: one optimizer step per `update` call, as traffic flows.

    Args:
        predictors: a PredictorSet (then `update` needs `layer`) or one LookaheadPredictor.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay on the residual.
        temperature: softmax temperature of the distillation loss.
        grad_clip: max gradient norm per layer update (None: no clipping).
        margin_weight: weight of `topk_margin_loss` added to the soft cross-entropy (0: off).
        margin: its margin, in logits.
    """

    def __init__(self, predictors: PredictorSet | LookaheadPredictor, lr: float = 1e-3, *,
                 weight_decay: float = 0.0, temperature: float = 1.0,
                 grad_clip: float | None = 1.0, margin_weight: float = 0.0,
                 margin: float = 1.0) -> None:
        if isinstance(predictors, LookaheadPredictor):
            self._single = True
            self._by_layer = {None: predictors}
        elif isinstance(predictors, PredictorSet):
            self._single = False
            self._by_layer = {layer: predictors[layer] for layer in predictors.layers}
        else:
            raise TypeError("predictors must be a PredictorSet or a LookaheadPredictor, got "
                            f"{type(predictors).__name__}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not margin_weight >= 0:
            raise ValueError(f"margin_weight must be >= 0, got {margin_weight!r}")
        self.margin_weight, self.margin = float(margin_weight), float(margin)
        self.predictors = predictors
        self.temperature = temperature
        self.grad_clip = grad_clip
        self.optimizers = {
            layer: torch.optim.AdamW(pred.trainable_parameters(), lr=lr,
                                     weight_decay=weight_decay)
            for layer, pred in self._by_layer.items()}
        self.num_updates = {layer: 0 for layer in self._by_layer}

    def _predictor(self, layer: int | None) -> tuple[int | None, LookaheadPredictor]:
        if self._single:
            if layer is not None:
                raise ValueError("layer must be None when distilling a single predictor")
            return None, self._by_layer[None]
        if layer not in self._by_layer:
            raise KeyError(f"no predictor for layer {layer}; have {sorted(self._by_layer)}")
        return layer, self._by_layer[layer]

    def update(self, h_prev: torch.Tensor, true_logits: torch.Tensor,
               layer: int | None = None) -> float:
        """One step on (h_prev [T, D], true_logits [T, E]); returns the loss before the step."""
        key, pred = self._predictor(layer)
        if h_prev.ndim != 2 or h_prev.shape[1] != pred.dim:
            raise ValueError(f"h_prev must be [T, {pred.dim}], got {tuple(h_prev.shape)}")
        if true_logits.shape != (h_prev.shape[0], pred.num_experts):
            raise ValueError(f"true_logits must be [T, E] = [{h_prev.shape[0]}, "
                             f"{pred.num_experts}], got {tuple(true_logits.shape)}")
        device = pred.router_weight.device
        pred.train()
        opt = self.optimizers[key]
        opt.zero_grad(set_to_none=True)
        true_logits = true_logits.to(device)
        pred_logits = pred(h_prev.to(device))
        loss = distill_loss(pred_logits, true_logits, self.temperature)
        if self.margin_weight > 0:
            loss = loss + self.margin_weight * topk_margin_loss(pred_logits, true_logits,
                                                                pred.top_k, self.margin)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(pred.trainable_parameters(), self.grad_clip)
        opt.step()
        self.num_updates[key] += 1
        return float(loss.detach())

    def update_all(self, hidden: torch.Tensor, logits: torch.Tensor) -> dict[int, float]:
        """One step on every layer from per-layer records: hidden [T, L, D], logits [T, L, E].

        Layer l trains on (hidden[:, l-1], logits[:, l]).
        """
        if self._single:
            raise ValueError("update_all needs a PredictorSet")
        return {layer: self.update(hidden[:, layer - 1], logits[:, layer], layer)
                for layer in self._by_layer}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"predictors": self.predictors.state_dict(),
                "optimizers": {str(k): opt.state_dict() for k, opt in self.optimizers.items()},
                "num_updates": {str(k): v for k, v in self.num_updates.items()},
                "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.predictors.load_state_dict(state["predictors"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][str(key)])
        self.num_updates = {k: int(state["num_updates"][str(k)]) for k in self.optimizers}
        self.temperature = float(state["temperature"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Predictor weights, optimizer moments and counters, in one torch file."""
        torch.save(self.state_dict(), str(path))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what `save_checkpoint` wrote (same layers and shapes)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        self.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


def train_offline(predictors: PredictorSet, hidden: torch.Tensor, logits: torch.Tensor, *,
                  epochs: int = 4, batch_size: int = 512, lr: float = 2e-3,
                  weight_decay: float = 0.0, temperature: float = 1.0, seed: int = 0,
                  lr_final: float | None = None,
                  progress: Callable[[int, int, dict[int, float]], None] | None = None,
                  ) -> list[dict[int, float]]:
    """Train every layer's residual on recorded samples; returns mean loss per layer per epoch.

    hidden: [N, L, D] router inputs of every MoE layer; logits: [N, L, E] router logits.
    Minibatches are drawn by shuffling the given tokens (split train/held-out before calling).
    The learning rate decays by cosine from lr to lr_final (default lr / 20).
    """
    if hidden.ndim != 3 or logits.ndim != 3 or hidden.shape[:2] != logits.shape[:2]:
        raise ValueError(f"hidden [N, L, D] and logits [N, L, E] disagree: "
                         f"{tuple(hidden.shape)} vs {tuple(logits.shape)}")
    if hidden.shape[1] != predictors.num_layers:
        raise ValueError(f"samples have {hidden.shape[1]} layers, predictors "
                         f"{predictors.num_layers}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    distiller = OnlineDistiller(predictors, lr, weight_decay=weight_decay,
                                temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    num = hidden.shape[0]
    steps_per_epoch = max(1, (num + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    lr_final = lr / 20 if lr_final is None else lr_final
    history = []
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(num, generator=gen)
        sums = {layer: 0.0 for layer in predictors.layers}
        for start in range(0, num, batch_size):
            frac = step / max(1, total - 1)
            distiller.set_lr(lr_final + 0.5 * (lr - lr_final) * (1 + torch.cos(
                torch.tensor(frac * torch.pi)).item()))
            idx = order[start:start + batch_size]
            h_b = hidden[idx].float()
            z_b = logits[idx].float()
            for layer, loss in distiller.update_all(h_b, z_b).items():
                sums[layer] += loss * len(idx)
            step += 1
        history.append({layer: s / num for layer, s in sums.items()})
        if progress is not None:
            progress(epoch, epochs, history[-1])
    return history
