"""Distil the shakespeare_char teacher into a smaller student on CPU.
python train.py config/shakespeare_char.py && python distill.py config/distill_shakespeare_char.py"""
dataset = "data/shakespeare_char"
teacher = "out/shakespeare_char"
out_dir = "out/distill_shakespeare_char"
n_layer = 2
n_head = 4
n_embd = 64
block_size = 128
batch_size = 32
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 1000
warmup_iters = 50
eval_interval = 250
eval_iters = 20
beta2 = 0.99
distill_type = "hybrid"
alpha = 0.5
temperature = 2.0
kd_loss = "forward_kl"
