"""GPT-2 on IMDB sentiment (25k train / 25k test reviews, 2 classes), the evaluation reference's recipe.
python classify.py config/classify_imdb.py                  # model=distilgpt2 batch_size=16, or model=out/<run>
Offline: train_file=imdb_train.csv test_file=imdb_test.csv (columns text,label) instead of data="imdb"."""
model = "gpt2"
data = "imdb"
max_len = 1024  # reference, IMDB text processing: truncation at 1024 tokens (reviews run long)
epochs = 3
batch_size = 8  # reference: gpt2 classification batch 8 (distilgpt2: 16)
learning_rate = 2e-5
warmup_ratio = 0.1
weight_decay = 0.01
grad_clip = 1.0
dropout = 0.1
label_smoothing = 0.0  # reference, IMDB label processing: "Label smoothing: None"
freeze_backbone_epochs = 1
