"""A small character-level model on the embedded Shakespeare corpus; trains on a laptop CPU in minutes.
python prepare/shakespeare.py && python train.py config/shakespeare_char.py"""
dataset = "data/shakespeare_char"
out_dir = "out/shakespeare_char"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 2000
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 10
weight_decay = 0.1
beta2 = 0.99  # small batches: a shorter second-moment memory (as nanoGPT's char config)
