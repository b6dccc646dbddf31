"""GPT-2 Large (774M) from scratch on OpenWebText, sized for one node of 8 x 80 GB GPUs.
python prepare/openwebtext.py && torchrun --standalone --nproc_per_node=8 train.py config/gpt2_large.py"""
dataset = "data/openwebtext"
out_dir = "out/gpt2_large"
model = "gpt2-large"
block_size = 1024
batch_size = 8  # per GPU per micro-step
gradient_accumulation_steps = 64  # 8 per GPU: 8 * 1024 * 64 = 524,288 tokens per step (~0.5M, GPT-3 table 2.1)
learning_rate = 2.5e-4  # GPT-3 760M (Brown et al. 2020, table 2.1)
min_lr = 2.5e-5
warmup_iters = 2000
max_iters = 100000  # ~52B tokens
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
eval_interval = 1000
eval_iters = 100
log_interval = 10
keep_last = 3
compile = True
