"""GPT-2 Large (774M) teacher -> randomly initialised GPT-2 Small (124M) student, T=2, alpha=0.5:
the recipe of the BabyLM distillation project, sized for 8 x 80 GB GPUs.
torchrun --standalone --nproc_per_node=8 distill.py config/distill_gpt2_large_to_small.py"""
dataset = "data/openwebtext"
teacher = "gpt2-large"  # or a local HF folder, or our out_dir
out_dir = "out/distill_gpt2_large_to_small"
model = "gpt2"
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 64  # 524,288 tokens per step over 8 GPUs
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
max_iters = 50000
weight_decay = 0.1
distill_type = "hybrid"
alpha = 0.5
temperature = 2.0
kd_loss = "forward_kl"
eval_interval = 1000
eval_iters = 100
keep_last = 3
compile = True
