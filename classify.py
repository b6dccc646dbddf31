"""Downstream evaluation: fine-tune our GPT as a text classifier, beside a head-only baseline.

    python classify.py config/classify_imdb.py model=gpt2
    python classify.py model=out/run data=reviews.csv                 # one file, split 90/10
    python classify.py model=out/run train_file=train.jsonl test_file=test.jsonl
    python classify.py compare=teacher=gpt2,student=out/student data=imdb,ag_news wikitext_file=wiki.test.raw

The recipe follows the GPT-2 classification evaluation reference: a linear head with dropout 0.1
on the final hidden state of the last real token, AdamW, 10% linear warmup then linear decay,
weight decay 0.01 on matrices only, clipping at 1.0, the head trained alone for the first epoch
and then every layer with per-layer learning rates. The baseline is the same model with only the
head trained for all epochs. Results go to results/<model>/<timestamp>/.

Data (labelled_text.py): imdb or ag_news, a local copy of a Hugging Face dataset (a folder
written by save_to_disk, with train and test splits of text and label), or local CSV/JSONL files.
"""
import csv
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

import checkpoint
from configurator import OUT_DIR, UserError, format_config, run
from evaluation import WIKITEXT_CONTEXT, WIKITEXT_STRIDE, evaluate_model, wikitext_text
from inputs import named_sources, read_text_file, timestamped
from labelled_text import dataset_specs, load_data, source_name
from losses import hard_loss
from optim import apply_gradients, lr_at, make_optimizer
from runtime import DTYPE_CHOICES, Runtime

DEFAULTS = dict(
    model="",  # our checkpoint (out_dir or .pt), a HF GPT-2 folder, or a GPT-2 name
    data="",  # imdb, ag_news, a save_to_disk folder or a .csv/.jsonl (split by test_fraction); several in compare mode
    train_file="",  # explicit training rows (.csv/.jsonl); alone, it is split by test_fraction
    test_file="",  # explicit test rows, beside train_file
    test_fraction=0.1,  # share of a lone file's rows held out for the test
    max_len=256,  # tokens per text, at most (capped at the model's block_size)
    cache_dir="data/classify",  # tokenised datasets, reused across runs
    results_dir="results",  # results go to results_dir/<model>/<timestamp>/
    # reference, "Optimization Configuration": num_epochs 3, classification batch 8 (gpt2; 16 for
    # distilgpt2), lr 2e-5, warmup_ratio 0.1, linear decay to 1e-7, weight_decay 0.01, max_grad_norm 1.0
    epochs=3,  # passes over the training rows
    batch_size=8,  # texts per step
    learning_rate=2e-5,  # peak learning rate of the top block and the head
    min_lr=1e-7,  # learning rate at the end of the linear decay
    warmup_ratio=0.1,  # share of the steps spent in linear warmup
    weight_decay=0.01,  # AdamW weight decay, on matrices only
    beta1=0.9, beta2=0.999,  # AdamW moment decay rates
    grad_clip=1.0,  # clip the gradient norm to this; 0: no clipping
    # reference, "Regularization": dropout 0.1 in attention, hidden states and the head. Its IMDB
    # section says no label smoothing; its general section says 0.1 (config/classify_agnews.py)
    dropout=0.1,  # dropout probability in the backbone and before the head
    label_smoothing=0.0,  # share of the target probability spread over the classes
    # reference, "Layer Freezing Strategy": head alone for 1 epoch, then all layers at 0.1x (lower),
    # 0.5x (middle), 1x (top) the base lr; 0.8 per block is the geometric stand-in: over GPT-2's 12
    # blocks it gives 0.07-0.13x in the lower third, 0.17-0.33x in the middle, 0.4-0.8x on top
    freeze_backbone_epochs=1,  # epochs that train the head alone before every layer trains
    layer_lr_decay=0.8,  # lr x this per block below the top
    baseline=True,  # also train the head-only baseline (backbone frozen for every epoch)
    compare="",  # name=source,... : one table of several models instead of model=
    wikitext_file="",  # compare mode: WikiText perplexity over this raw text file (wiki.test.raw) ...
    wikitext="",  # ... or over WikiText's test split: a config (e.g. wikitext-2-raw-v1) or a save_to_disk copy
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    seed=1337,  # seed of the head's initialisation and of the batch order
)
LIMITS = dict(
    test_fraction="(0, 1)", max_len="[1, inf)", cache_dir=OUT_DIR, results_dir=OUT_DIR, epochs="[1, inf)",
    batch_size="[1, inf)", learning_rate="(0, inf)", min_lr="[0, inf)", warmup_ratio="[0, 1]",
    weight_decay="[0, inf)", beta1="[0, 1)", beta2="[0, 1)", grad_clip="[0, inf)", dropout="[0, 1)",
    label_smoothing="[0, 1)", freeze_backbone_epochs="[0, inf)", layer_lr_decay="(0, 1]",
    dtype=DTYPE_CHOICES, seed="[0, inf)",
)


# ---------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """A linear layer over the backbone's final hidden state at each row's last non-pad token.

    The last token is the only one that has attended to the whole (causal) text, so it plays the
    role BERT's [CLS] plays; rows are right-padded, which leaves earlier positions untouched.
    """

    def __init__(self, backbone, n_classes, dropout=0.1, pad_id=0):
        super().__init__()
        self.backbone = backbone
        self.pad_id = pad_id
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, n_classes)
        # reference: head initialised from a truncated normal; std 0.02 as GPT-2's own layers
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):  # make_optimizer reads n_layer from here for layer-wise learning rates
        return self.backbone.config

    def depth_of(self, name):
        """The backbone's depths; the classification head sits with its final norm, on top."""
        return self.backbone.depth_of(name.removeprefix("backbone."))

    def features(self, idx, lengths=None):
        """(B, T) right-padded ids -> (B, C) hidden state at each row's last real token.
        Without lengths, a row ends after its last token that is not pad_id (only safe when the
        pad id never ends a real text, e.g. GPT-2's <|endoftext|>)."""
        B, T = idx.shape
        if lengths is None:
            real = (idx != self.pad_id).int()
            lengths = T - real.flip(1).argmax(1)  # position after the last real token
        h = self.backbone.hidden_states(idx)
        return h[torch.arange(B, device=idx.device), lengths - 1]

    def forward(self, idx, lengths=None):
        return self.head(self.drop(self.features(idx, lengths)))


# ---------------------------------------------------------------- training and scoring


@torch.no_grad()
def last_hidden(clf, data, batch_size, rt):
    """(N, C) float32 features of every row, in eval mode, and the tokens/s of that pass."""
    clf.eval()
    out = []
    t = time.perf_counter()
    for i in range(0, len(data), batch_size):
        x, lengths, _ = data.batch(np.arange(i, min(i + batch_size, len(data))), clf.pad_id, rt.device)
        with rt.autocast():
            out.append(clf.features(x, lengths).float())
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), int(data.lengths.sum()) / max(time.perf_counter() - t, 1e-9)


def train_classifier(clf, train, cfg, rt, frozen_epochs, train_feats):
    """The recipe; for the first frozen_epochs only the head trains, on the backbone's features
    computed once (eval mode, no graph), then every layer. Returns the mean loss of each epoch."""
    steps_per_epoch = -(-len(train) // cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    schedule = dict(learning_rate=cfg["learning_rate"], min_lr=cfg["min_lr"], max_iters=total,
                    warmup_iters=int(cfg["warmup_ratio"] * total), lr_decay_iters=0, decay="linear")
    # one optimizer from the start: frozen parameters get no gradient, so AdamW leaves them alone
    optimizer = make_optimizer(clf, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    labels = torch.from_numpy(train.labels).to(rt.device)
    step, epoch_losses = 0, []
    for epoch in range(cfg["epochs"]):
        frozen = epoch < frozen_epochs
        clf.train()
        # the same order in the baseline and the fine-tuned run: their frozen epochs are identical
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(len(train))
        losses = []
        for i in range(0, len(order), cfg["batch_size"]):
            rows = order[i:i + cfg["batch_size"]]
            with rt.autocast():
                if frozen:
                    y = labels[rows]
                    logits = clf.head(clf.drop(train_feats[torch.from_numpy(rows).to(rt.device)]))
                else:
                    x, lengths, y = train.batch(rows, clf.pad_id, rt.device)
                    logits = clf(x, lengths)
            loss = hard_loss(logits.float(), y, label_smoothing=cfg["label_smoothing"])
            scaler.scale(loss).backward()
            apply_gradients(optimizer, scaler, clf.parameters(), lr_at(step, schedule), cfg["grad_clip"])
            losses.append(loss.item())
            step += 1
        epoch_losses.append(float(np.mean(losses)))
        print(f"  epoch {epoch + 1}/{cfg['epochs']} ({'head only' if frozen else 'all layers'}): "
              f"train loss {epoch_losses[-1]:.4f}", flush=True)
    return epoch_losses


def scores(labels, preds, n_classes):
    """Accuracy, macro-F1 over the classes present in labels or predictions (as scikit-learn's
    default), and the confusion matrix (rows true, columns predicted)."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return dict(accuracy=float(tp.sum() / confusion.sum()), macro_f1=float(f1.mean()),
                confusion=confusion.tolist())


def _new_classifier(backbone, n_classes, cfg, pad_id, device):
    torch.manual_seed(cfg["seed"])  # the baseline and the fine-tuned run start from the same head
    return GPTClassifier(backbone, n_classes, cfg["dropout"], pad_id).to(device)


def classify(cfg, rt, source, name, spec, out_dir):
    """Fine-tune `source` on one dataset (and train the head-only baseline); write and return
    the metrics."""
    from tokenizer import identity, tokenizer_from_meta

    t0 = time.perf_counter()
    backbone, tok_info, _ = checkpoint.load_model(source, rt.device, dropout=cfg["dropout"])
    tok = tokenizer_from_meta(tok_info)
    max_len = min(cfg["max_len"], backbone.config.block_size)
    if max_len < cfg["max_len"]:
        print(f"max_len {cfg['max_len']} exceeds the model's context: texts truncated to {max_len} tokens")
    train, test, names, cache = load_data(name, spec, tok, tok_info, max_len, cfg)
    pad_id = tok.eot if tok.eot is not None else 0  # rows carry their lengths: any id works
    print(f"{name}: {len(train)} train / {len(test)} test rows, {len(names)} classes, max_len {max_len}")

    results, preds, train_feats = {}, {}, None
    runs = (("baseline", cfg["epochs"]),) if cfg["baseline"] else ()
    runs += (("finetuned", min(cfg["freeze_backbone_epochs"], cfg["epochs"])),)
    if any(frozen for _, frozen in runs):
        # features of the untouched backbone, computed once, serve every head-only epoch
        train_feats, _ = last_hidden(GPTClassifier(backbone, len(names), pad_id=pad_id), train,
                                     cfg["batch_size"], rt)
    for run_name, frozen_epochs in runs:
        print(f"{run_name}: head only for {frozen_epochs} of {cfg['epochs']} epochs", flush=True)
        clf = _new_classifier(backbone, len(names), cfg, pad_id, rt.device)
        t = time.perf_counter()
        losses = train_classifier(clf, train, cfg, rt, frozen_epochs, train_feats)
        train_s = time.perf_counter() - t
        feats, tok_s = last_hidden(clf, test, cfg["batch_size"], rt)
        with torch.no_grad():
            preds[run_name] = clf.head(feats).argmax(-1).cpu().numpy()
        results[run_name] = dict(scores(test.labels, preds[run_name], len(names)), train_loss=losses,
                                 train_seconds=train_s, test_tok_s=tok_s)
    metrics = dict(model=source, data=name, labels=names, n_train=len(train), n_test=len(test),
                   max_len=max_len, params=backbone.num_params(), **results,
                   wall_seconds=time.perf_counter() - t0)
    write_results(out_dir, cfg, metrics, test.labels, preds, names,
                  dict(tokenizer=identity(tok_info), cache=cache))
    print(report(metrics))
    return metrics


# ---------------------------------------------------------------- results


def write_results(out_dir, cfg, metrics, labels, preds, names, extra):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, labels={n: i for i, n in enumerate(names)}, **extra), f, indent=2)
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "label", *preds])
        for i, row in enumerate(zip(labels, *preds.values())):
            w.writerow([i, *map(int, row)])
    plot_confusion(os.path.join(out_dir, "confusion.png"), metrics, names)
    print(f"wrote {out_dir}/{{metrics.json,config.json,predictions.csv,confusion.png}}")


def plot_confusion(path, metrics, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in ("finetuned", "baseline") if r in metrics]
    size = 1.5 + 0.45 * len(names)
    fig, axes = plt.subplots(1, len(runs), figsize=(size * len(runs) + 1, size + 0.5), squeeze=False)
    for ax, run_name in zip(axes[0], runs):
        m = np.array(metrics[run_name]["confusion"])
        ax.imshow(m, cmap="Blues")
        ax.set_title(f"{run_name}: acc {metrics[run_name]['accuracy']:.3f}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(names) <= 20:
            for (r, c), v in np.ndenumerate(m):
                ax.text(c, r, str(v), ha="center", va="center",
                        color="white" if v > m.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(metrics):
    names = metrics["labels"]
    lines = [f"\n{metrics['model']} on {metrics['data']} ({metrics['n_test']} test rows)",
             "| run | accuracy | macro-F1 |", "| --- | ---: | ---: |"]
    for run_name, label in (("finetuned", "fine-tuned"), ("baseline", "baseline (head only)")):
        if run_name in metrics:
            lines.append(f"| {label} | {metrics[run_name]['accuracy']:.4f} | {metrics[run_name]['macro_f1']:.4f} |")
    corner = "true \\ pred"
    width = max(len(n) for n in names + [corner])
    lines.append("\nconfusion matrix of the fine-tuned model (rows true, columns predicted):")
    lines.append(f"{corner:<{width}} " + " ".join(f"{n[:8]:>8}" for n in names))
    for n, row in zip(names, metrics["finetuned"]["confusion"]):
        lines.append(f"{n:<{width}} " + " ".join(f"{v:>8}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------- compare mode


def compare(cfg, rt, specs):
    """One table: params, WikiText PPL, accuracy / F1 on each dataset and tokens/s per model."""
    from tokenizer import tokenizer_from_meta

    text = None
    if cfg["wikitext_file"]:
        text = read_text_file(cfg["wikitext_file"], "wikitext_file=")
    elif cfg["wikitext"]:
        text = wikitext_text(cfg["wikitext"])
    root = timestamped(os.path.join(cfg["results_dir"], "compare"))
    rows = {}
    for model_name, source in named_sources(cfg["compare"], "compare"):
        model, tok_info, _ = checkpoint.load_model(source, rt.device)
        row = dict(source=source, params=model.num_params())
        if text is not None:
            block = min(WIKITEXT_CONTEXT, model.config.block_size)
            tokens = np.array(tokenizer_from_meta(tok_info).encode(text), dtype=np.int64)
            r = evaluate_model(model, tokens, block, min(WIKITEXT_STRIDE, block), cfg["batch_size"], rt.device,
                               rt.autocast())
            row.update(wikitext_ppl=r["ppl"], tok_s=r["tok_s"], tok_s_from="wikitext")
        del model
        for data_name, spec in specs:
            m = classify(cfg, rt, source, data_name, spec, os.path.join(root, f"{model_name}-{data_name}"))
            row[data_name] = {k: dict(accuracy=m[k]["accuracy"], macro_f1=m[k]["macro_f1"])
                              for k in ("finetuned", "baseline") if k in m}
            row.setdefault("tok_s", m["finetuned"]["test_tok_s"])
            row.setdefault("tok_s_from", f"{data_name} test pass")
        rows[model_name] = row
    table = compare_table(rows, [n for n, _ in specs], text is not None)
    print("\n" + table)
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump(dict(results=rows, config=cfg), f, indent=2)
    with open(os.path.join(root, "compare.md"), "w") as f:
        f.write(table + "\n")
    print(f"wrote {root}/compare.{{json,md}}")
    return rows


def compare_table(rows, datasets, with_ppl):
    head = ["model", "params"] + (["WikiText PPL"] if with_ppl else [])
    for d in datasets:
        head += [f"{d} acc", f"{d} F1", f"{d} head-only acc"]
    head.append("inference tok/s")
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in rows.items():
        cells = [name, f"{r['params'] / 1e6:.2f}M"] + ([f"{r['wikitext_ppl']:.3f}"] if with_ppl else [])
        for d in datasets:
            ft, base = r[d]["finetuned"], r[d].get("baseline")
            cells += [f"{ft['accuracy']:.4f}", f"{ft['macro_f1']:.4f}",
                      f"{base['accuracy']:.4f}" if base else "-"]
        cells.append(f"{r['tok_s']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    source = "WikiText evaluation" if with_ppl else f"the {datasets[0]} test pass"
    lines.append(f"\ninference tok/s: forward tokens per second over {source}")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def main(cfg):
    if bool(cfg["model"]) == bool(cfg["compare"]):
        raise UserError("give model= (one model) or compare=name=source,... (a table of several)")
    specs = dataset_specs(cfg)
    rt = Runtime(cfg)
    try:
        if rt.ddp:
            raise UserError("classify.py runs on one device: start it with python, not torchrun")
        print(f"config:\n{format_config(cfg)}")
        if cfg["compare"]:
            return compare(cfg, rt, specs)
        if len(specs) > 1:
            raise UserError("one dataset per run; use compare= to score several")
        name, spec = specs[0]
        model = cfg["model"]
        model_name = source_name(model) if model.endswith(".pt") else os.path.basename(model.rstrip("/"))
        return classify(cfg, rt, model, name, spec, timestamped(os.path.join(cfg["results_dir"], model_name)))
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
