"""A teacher run once over a dataset's train split, kept on disk: the format, its writer and reader.

Window i of the train split is tokens [i*T, i*T + T] (T = block_size): T inputs, T targets; a cache
holds the first `windows` of them (by default all the split's whole windows). For each
target the cache holds the teacher's T=1 log-probabilities of its top_k tokens, in descending order,
and in one more column the log of the probability mass outside them; with top_k=0 it holds all V
log-probabilities and no ids. Files in the cache folder (default data/<name>/teacher_<id>/):

  logp.bin   (windows*T, top_k + 1 or V) cache_dtype   log-probabilities (+ the rest's log-mass)
  ids.bin    (windows*T, top_k) uint16/uint32          the top-k token ids (absent for top_k=0)
  meta.json  what was cached from what: teacher, dataset and tokenizer identities, T, k, dtypes,
             sizes; "complete" turns true only once every block is on disk
  progress.bin  one byte per block of batch_size windows while writing: 1 once the block's data
                is fsynced. A rerun computes the blocks still at 0 with the same block boundaries,
                so an interrupted cache ends byte-identical to an uninterrupted one.

cache_teacher.py writes it; distill.py teacher_cache= reads it through CachedDataset.
"""
import hashlib
import json
import os
import queue
import threading

import numpy as np
import torch

import checkpoint
from configurator import UserError
from data import BinDataset
from inputs import comma_list
from tokenizer import check_same

FORMAT = 1
LOGP, IDS, META, PROGRESS = "logp.bin", "ids.bin", "meta.json", "progress.bin"
# float16 by default: log-probabilities lie in [-65504, 0] in practice, where float16's 10-bit
# mantissa is 8x finer than bfloat16's 7 (a log-prob near -10 is off by <0.004, not <0.03)
DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16),
          "float32": (np.float32, torch.float32)}


# ---------------------------------------------------------------- identities


def parse_teachers(spec):
    """"a" or "a,b" or "a,b,0.7,0.3" -> (sources, weights summing to 1; equal by default)."""
    sources, weights = [], []
    for item in comma_list(spec, "teacher"):
        try:
            weights.append(float(item))
        except ValueError:
            sources.append(item)
    if not sources:
        raise UserError(f"teacher={spec!r} names no teacher: give out_dirs, HF folders or GPT-2 names")
    if weights and (len(weights) != len(sources) or min(weights) <= 0):
        raise UserError(f"teacher={spec!r}: give one positive weight per teacher after the "
                        f"teachers (e.g. a,b,0.7,0.3), or none for equal weights")
    weights = weights or [1.0] * len(sources)
    return sources, [w / sum(weights) for w in weights]


def model_sha256(model):
    """Hash of a model's weights and configuration: the teacher's identity in a cache."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teachers(spec, data):
    """The teachers teacher=spec names, on the CPU, checked against the dataset's tokenizer:
    (models, weights, identity), identity = sources, weights, per-teacher and combined hashes."""
    sources, weights = parse_teachers(spec)
    models, hashes = [], []
    for source in sources:
        model, tok, _ = checkpoint.load_model(source)
        check_same(f"teacher {source}", tok, f"dataset {data.dir}", data.tokenizer,
                        "every teacher must share the data's tokenizer")
        models.append(model.eval().requires_grad_(False))
        hashes.append(model_sha256(model))
    return models, weights, _identity(sources, weights, hashes)


def _identity(sources, weights, hashes):
    combined = hashlib.sha256(json.dumps([hashes, weights]).encode()).hexdigest()
    return dict(sources=sources, weights=weights, sha256=hashes, id=combined)


def remote_identity(api_base, model):
    """The identity of a teacher behind an endpoint: its name there, all that can be known of it
    (new weights served under the same name look the same; write such a cache again)."""
    source = f"{model}@{api_base}"
    return _identity([source], [1.0], [hashlib.sha256(source.encode()).hexdigest()])


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def dataset_sha256(data):
    """Identity of what a cache was computed from: train.bin and its meta.json."""
    meta = json.dumps(data.meta, sort_keys=True)
    return hashlib.sha256(f"{file_sha256(os.path.join(data.dir, 'train.bin'))}:{meta}".encode()).hexdigest()


# ---------------------------------------------------------------- layout and meta


def layout(vocab_size, block_size, top_k, cache_dtype, batch_size, windows):
    """The shape of a cache's files: columns, dtypes, sizes and blocks."""
    ids_dtype = None if top_k == 0 else ("uint16" if vocab_size <= 1 << 16 else "uint32")
    cols = vocab_size if top_k == 0 else top_k + 1
    value_bytes = np.dtype(DTYPES[cache_dtype][0]).itemsize
    id_bytes = 0 if ids_dtype is None else np.dtype(ids_dtype).itemsize
    rows = windows * block_size
    files = {LOGP: rows * cols * value_bytes, **({IDS: rows * top_k * id_bytes} if ids_dtype else {})}
    return dict(vocab_size=vocab_size, block_size=block_size, top_k=top_k, columns=cols,
                cache_dtype=cache_dtype, ids_dtype=ids_dtype, windows=windows, tokens=rows,
                bytes_per_token=cols * value_bytes + top_k * id_bytes, batch_size=batch_size, files=files)


def make_meta(teacher, data, block_size, top_k, cache_dtype, batch_size, windows=0):
    """meta.json of a cache of the first `windows` windows (0: all) before it is complete; its
    "id" names the default folder."""
    windows = windows or data.windows_of(block_size)
    meta = dict(format=FORMAT, teacher=teacher,
                dataset=dict(path=os.path.normpath(data.dir), sha256=dataset_sha256(data)),
                tokenizer=data.tokenizer,
                **layout(data.vocab_size, block_size, top_k, cache_dtype, batch_size, windows))
    key = [teacher["id"], meta["dataset"]["sha256"], block_size, top_k, cache_dtype, windows]
    meta["id"] = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]
    return meta


def blocks_of(meta):
    return -(-meta["windows"] // meta["batch_size"])


def read_meta(folder):
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError:
            raise UserError(f"{path} is not valid JSON: remove {folder} and write the cache again") from None


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    checkpoint.fsync_dir(os.path.dirname(path) or ".")


def _settings(meta):
    """What a cache is, without what only describes it (paths as typed) or changes as it is written."""
    settings = {k: v for k, v in meta.items() if k != "complete"}
    settings["teacher"] = {k: v for k, v in meta["teacher"].items() if k != "sources"}
    settings["dataset"] = meta["dataset"]["sha256"]
    return settings


def _differs(old, new):
    """The first setting (in make_meta's order: causes before their consequences) in which two
    metas differ, as 'key: old (now new)', or None."""
    old, new = _settings(old), _settings(new)
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))[:80]} (now {json.dumps(new.get(key))[:80]})"
    return None


def plan(folder, meta, overwrite):
    """What writing `meta` into `folder` means: "new", "resume" or "complete". Reads only, so every
    rank may call it; a folder holding another cache or other files is refused."""
    old = read_meta(folder)
    if old is not None and not overwrite:
        diff = _differs(old, meta)
        if diff:
            raise UserError(f"{folder} holds a cache of other settings ({diff}): use another out= "
                            f"or overwrite=True to replace it")
        return "complete" if old.get("complete") else "resume"
    foreign = sorted(set(os.listdir(folder)) - {LOGP, IDS, META, PROGRESS, META + ".tmp"}) \
        if os.path.isdir(folder) else []
    if foreign:
        raise UserError(f"{folder} holds files that are not a teacher cache ({foreign[0]}, ...): "
                        f"choose an empty or new out=")
    return "new"


def create(folder, meta):
    """Preallocate the files (zeros), mark no block done, then write meta.json: a folder whose
    meta.json is missing was never begun, and is started over."""
    os.makedirs(folder, exist_ok=True)
    for name in (META, LOGP, IDS, PROGRESS):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    sizes = dict(meta["files"], **{PROGRESS: blocks_of(meta)})
    for name, size in sizes.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    _write_json(os.path.join(folder, META), dict(meta, complete=False))


def blocks_done(folder):
    with open(os.path.join(folder, PROGRESS), "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8).copy()


def finish(folder, meta):
    """Once every block is on disk: meta.json says complete, progress.bin goes."""
    done = blocks_done(folder)
    if not done.all():
        raise UserError(f"{folder}: blocks {np.flatnonzero(done == 0)[:5].tolist()}... were not "
                        f"written (a rank failed?); rerun the same command to finish the cache")
    _write_json(os.path.join(folder, META), dict(meta, complete=True))
    os.remove(os.path.join(folder, PROGRESS))
    checkpoint.fsync_dir(folder)


# ---------------------------------------------------------------- writing blocks


def _pwrite_all(fd, buf, offset):
    # one pwrite moves at most ~2 GiB on Linux, and may move less
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class Writer:
    """Writes blocks into a cache folder's preallocated files from a background thread, so the
    device computes the next block while this one goes to disk; a block's byte in progress.bin
    is set only after its data is fsynced."""

    def __init__(self, folder, meta, depth=2):
        self.meta = meta
        self.value_dtype = DTYPES[meta["cache_dtype"]][1]
        self.row_bytes = {LOGP: meta["columns"] * torch.finfo(self.value_dtype).bits // 8}
        if meta["ids_dtype"]:
            self.row_bytes[IDS] = meta["top_k"] * np.dtype(meta["ids_dtype"]).itemsize
        self.fds = {name: os.open(os.path.join(folder, name), os.O_WRONLY) for name in self.row_bytes}
        self.progress = os.open(os.path.join(folder, PROGRESS), os.O_WRONLY)
        self.queue, self.error = queue.Queue(maxsize=depth), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, block, values, ids):
        """Queue block `block`'s rows (values float32, ids int32 or None, on any device)."""
        if self.error:
            raise self.error
        low = torch.finfo(self.value_dtype).min  # -inf would poison every divergence it enters
        data = {LOGP: values.clamp(min=low).to(self.value_dtype).cpu().view(torch.uint8).numpy()}
        if ids is not None:
            data[IDS] = ids.cpu().numpy().astype(self.meta["ids_dtype"])
        self.queue.put((block, data))

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error:
                continue  # drained, so that put() never waits on a dead writer
            block, data = item
            try:
                first_row = block * self.meta["batch_size"] * self.meta["block_size"]
                for name, array in data.items():
                    _pwrite_all(self.fds[name], memoryview(array).cast("B"), first_row * self.row_bytes[name])
                for name in data:
                    os.fsync(self.fds[name])
                os.pwrite(self.progress, b"\x01", block)
                os.fsync(self.progress)
            except OSError as e:
                self.error = e

    def close(self):
        self.queue.put(None)
        self.thread.join()
        for fd in (*self.fds.values(), self.progress):
            os.close(fd)
        if self.error:
            raise self.error


# ---------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache folder, checked whole: its meta and memmaps of its files."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise UserError(f"teacher_cache={folder} not found: write it with cache_teacher.py")
        meta = read_meta(folder)
        if meta is None:
            raise UserError(f"{folder} has no {META}: not a teacher cache, or cache_teacher.py "
                            f"stopped before it began; run it again")
        if meta.get("format") != FORMAT:
            raise UserError(f"{folder} is a teacher cache of format {meta.get('format')}, this code "
                            f"reads format {FORMAT}: write it again with cache_teacher.py")
        if not meta.get("complete"):
            raise UserError(f"{folder} is incomplete (its writing was interrupted): rerun the same "
                            f"cache_teacher.py command to finish it")
        for name, size in meta["files"].items():
            path = os.path.join(folder, name)
            actual = os.path.getsize(path) if os.path.isfile(path) else None
            if actual != size:
                raise UserError(f"{path} is {'missing' if actual is None else f'{actual} bytes'}, "
                                f"{META} says {size} bytes: truncated or replaced; write the cache "
                                f"again (cache_teacher.py overwrite=True)")
        self.folder, self.meta = folder, meta
        self.T, self.windows = meta["block_size"], meta["windows"]
        self.value_dtype = DTYPES[meta["cache_dtype"]][1]
        rows = self.windows * self.T
        self.logp = np.memmap(os.path.join(folder, LOGP), DTYPES[meta["cache_dtype"]][0], "r",
                              shape=(rows, meta["columns"]))
        self.ids = None if not meta["top_k"] else np.memmap(
            os.path.join(folder, IDS), meta["ids_dtype"], "r", shape=(rows, meta["top_k"]))

    def check(self, data, block_size, teacher_id=None):
        """Refuse a cache that was not written for this data, context and (if given) teacher."""
        meta, where = self.meta, self.folder
        check_same(f"teacher cache {where}", meta["tokenizer"], f"dataset {data.dir}",
                   data.tokenizer, "distill from a cache written for this dataset")
        if meta["dataset"]["sha256"] != dataset_sha256(data):
            raise UserError(f"{where} was written from {meta['dataset']['path']}, whose train split "
                            f"differs from dataset={data.dir}: use that dataset or write a cache for this one")
        if block_size != self.T:
            raise UserError(f"{where} holds windows of block_size={self.T}, not {block_size}: set "
                            f"block_size={self.T} or write a cache with block_size={block_size}")
        if self.windows > data.windows_of(self.T):
            raise UserError(f"{where} holds {self.windows} windows but {data.dir}'s train split has "
                            f"{data.windows_of(self.T)}: write the cache again")
        if teacher_id is not None and teacher_id["id"] != meta["teacher"]["id"]:
            raise UserError(f"{where} was written from teacher {','.join(meta['teacher']['sources'])} "
                            f"but teacher={','.join(teacher_id['sources'])} has other weights or "
                            f"weighting: drop teacher= or write a cache for this teacher")

    def rows(self, windows):
        """(len(windows), T, columns) cached values and (len(windows), T, top_k) int64 ids (or
        nothing for top_k=0) of the given windows."""
        def gather(array):
            return np.stack([array[i * self.T:(i + 1) * self.T] for i in windows])
        values = torch.from_numpy(gather(self.logp)).view(self.value_dtype)
        if self.ids is None:
            return (values,)
        return values, torch.from_numpy(gather(self.ids).astype(np.int64))


class CachedDataset(BinDataset):
    """A prepared dataset whose training batches are cached teacher windows: a batch is
    (x, y, cached values[, ids]), its rows drawn among the windows as a pure function of
    (seed, step, micro-step, rank) like BinDataset's, among the cache's first train_windows
    windows (0: all it holds). Validation batches are BinDataset's."""

    def __init__(self, data_dir, cache, train_windows=0):
        if train_windows > cache.windows:
            raise UserError(f"train_windows={train_windows} exceeds the {cache.windows} windows "
                            f"{cache.folder} holds: lower it, or cache more windows")
        super().__init__(data_dir, train_windows or cache.windows)
        self.cache = cache

    def batch(self, split, batch_size, block_size, seed, step, micro, world_size=1, rank=0):
        if split != "train":
            return super().batch(split, batch_size, block_size, seed, step, micro, world_size, rank)
        windows = self.drawn_windows(batch_size, seed, step, micro, world_size, rank)
        x, y = self._window(split, windows * self.cache.T, self.cache.T)
        return (x, y, *self.cache.rows(windows))
