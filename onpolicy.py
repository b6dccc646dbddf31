"""On-policy distillation: part of every training batch is text the student writes itself.

Output and logit distillation train on text the student did not write, so it never learns from
the mistakes it makes when it continues its own text (exposure bias). GKD (Agarwal et al. 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes") and MiniLLM
(Gu et al. 2024) sample continuations from the student and take the divergence to the teacher on
those tokens. Here `on_policy` of each micro-batch's rows are such continuations: a prompt (the
first prompt_len tokens of the drawn window, or a prompt from a JSONL file) continued by the
current student, without gradients and in eval mode, to block_size tokens.

The first rows of a micro-batch are the student's, the rest the dataset's windows as off-policy
distillation draws them. Generated tokens have no ground truth, so their loss is the divergence
alone, at the weight (1 - alpha) it has on the dataset's tokens, and the cross-entropy (alpha)
is taken on the dataset's rows only; a prompt's own tokens are not counted. Every counted token
weighs the same across rows, micro-batches and ranks (trainer.forward_backward), so `on_policy`
is the share of the divergence's rows taken on the student's own text.

Each row samples from its own generator seeded by (seed, step, the micro-batch's place in the
global batch, row): what a resumed run or another number of ranks generates is what an
uninterrupted single process generates.
"""
import contextlib

import numpy as np
import torch

import engine
from configurator import UserError
from inputs import check_file, field, read_jsonl
from losses import default_chunk_rows, kd_loss, soft_loss, with_cosine
from tokenizer import tokenizer_from_meta

ON_POLICY_STREAM = 3  # keeps these seeds apart from the data's and dropout's (trainer.dropout_seed)


def rows_of(on_policy, batch_size):
    """Rows of a micro-batch the student writes: on_policy of batch_size, rounded, at least one."""
    rows = round(on_policy * batch_size)
    if rows == 0:
        raise UserError(f"on_policy={on_policy} of batch_size={batch_size} rows rounds to no row: raise "
                        f"on_policy to at least {0.5 / batch_size:.3g} or batch_size")
    return rows


def read_prompts(path, tokenizer_info, block_size):
    """Token ids of the prompts of a JSONL file ({"prompt": text, ...} a line), tokenised with the
    data's tokenizer; each must leave at least one token of block_size to generate."""
    check_file(path, "prompts=")
    tok = tokenizer_from_meta(tokenizer_info)
    prompts = []
    for n, text in read_jsonl(path, lambda record: field(record, "prompt")):
        try:
            ids = tok.encode(text)
        except UserError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        if len(ids) >= block_size:
            raise UserError(f"{path}:{n}: the prompt is {len(ids)} tokens; the student continues it "
                            f"to block_size={block_size}, so it must be shorter: shorten it or raise block_size")
        prompts.append(ids)
    if not prompts:
        raise UserError(f"prompts={path} holds no prompts: write one JSON object with a 'prompt' per line")
    return prompts


def continue_rows(model, prompts, T, generators, temperature=1.0, autocast=None):
    """Each prompt (token ids, shorter than T) continued by `model` to T tokens: (x, y), (n, T)
    long tensors on the CPU, y[j] = x[j + 1] where x[j + 1] was generated and -1 elsewhere (the
    prompt's own tokens, the last position). Row i samples with generators[i].

    Prompts of different lengths are generated in groups whose lengths differ by at most the
    model's spare context: a batch's left-padded columns hold its longest prompt plus the tokens
    its shortest one needs, and columns past the context would make the engine slide its window
    by recomputing every remaining step."""
    spare = model.config.block_size + 1 - T
    x = torch.zeros(len(prompts), T, dtype=torch.long)
    y = torch.full((len(prompts), T), -1, dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = []
    for i in order:
        if groups and len(prompts[i]) - len(prompts[groups[-1][0]]) <= spare:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        new = T - len(prompts[group[0]])
        with autocast or contextlib.nullcontext():
            out = engine.generate(model, [prompts[i] for i in group], new, temperature=temperature,
                                  generator=[generators[i] for i in group])
        for i, c in zip(group, out):
            p = len(prompts[i])
            x[i] = torch.tensor(prompts[i] + c.tokens[:T - p])
            y[i, p - 1:T - 1] = x[i, p:]
    return x, y


class OnPolicyData:
    """A dataset whose training batches begin with `rows` the student writes from prompts (the
    first prompt_len tokens of the windows drawn, or `prompts`, token id lists picked at random);
    its batches carry the number of those rows for the loss. Everything else is the wrapped
    dataset's."""

    def __init__(self, data, student, rows, prompt_len, prompts, temperature, rt):
        self.data, self.student, self.rows, self.prompt_len = data, student, rows, prompt_len
        self.prompts, self.temperature, self.rt = prompts, temperature, rt

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, split, batch_size, block_size, seed, step, micro, world_size=1, rank=0):
        x, y = self.data.batch(split, batch_size, block_size, seed, step, micro, world_size, rank)
        if split != "train":
            return x, y
        k = self.rows
        seeds = np.random.SeedSequence([seed, step, micro * world_size + rank, ON_POLICY_STREAM])
        seeds = seeds.generate_state(k + 1, np.uint64).tolist()
        if self.prompts is None:
            prompts = x[:k, :self.prompt_len].tolist()
        else:
            picks = np.random.default_rng(seeds[k]).integers(0, len(self.prompts), size=k)
            prompts = [self.prompts[i] for i in picks]
        gens = [torch.Generator(self.rt.device).manual_seed(s) for s in seeds[:k]]
        x_own, y_own = continue_rows(self.student, prompts, block_size, gens, self.temperature,
                                     self.rt.autocast())
        return torch.cat([x_own, x[k:]]), torch.cat([y_own, y[k:]]), torch.tensor(k)


def on_policy_loss_fn(teacher, vocab_size, alpha, kind="reverse_kl", temperature=1.0, jsd_beta=0.5,
                      label_smoothing=0.0, chunk_rows=0, alpha_cos=0.0, compile_teacher=False):
    """`loss_fn(model, x, y, own) -> (loss, parts)` for OnPolicyData's batches, whose first `own`
    rows the student wrote: over every counted token, the mean of alpha * CE + (1 - alpha) * soft
    on the dataset's rows and (1 - alpha) * soft on the student's. Parts, each the mean over its
    own tokens (a (mean, count) pair, see trainer.forward_backward): hard and soft on the dataset's
    rows, soft_own on the student's, and cos over all."""
    chunk_rows = chunk_rows or default_chunk_rows(vocab_size)
    teacher_hidden = torch.compile(teacher.hidden_states) if compile_teacher else teacher.hidden_states
    settings = (kind, temperature, jsd_beta, vocab_size, chunk_rows, teacher.head_weight, label_smoothing)

    def loss_fn(model, x, y, own):
        k = int(own)
        logits, _, h = model(x, return_hidden=True)
        with torch.no_grad():
            t_h = teacher_hidden(x)
        n_own, n_data = int((y[:k] >= 0).sum()), int((y[k:] >= 0).sum())
        # the divergence alone: the student's text has no ground truth to take a cross-entropy on
        mine = soft_loss(logits[:k], t_h[:k], kind, temperature, jsd_beta, y[:k] >= 0, vocab_size,
                         chunk_rows, teacher.head_weight)
        loss, parts = (1 - alpha) * n_own * mine, dict(soft_own=(mine.detach(), n_own))
        if k < x.size(0):
            theirs, hard, soft = kd_loss(logits[k:], t_h[k:], y[k:], alpha, *settings)
            loss = loss + n_data * theirs
            parts.update(hard=(hard, n_data), soft=(soft, n_data))
        return with_cosine(loss / max(n_own + n_data, 1), parts, alpha_cos, h, t_h, y)
    return loss_fn
