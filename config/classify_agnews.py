"""GPT-2 on AG News topics (120k train / 7.6k test, 4 classes: World, Sports, Business, Sci/Tech).
python classify.py config/classify_agnews.py                # model=distilgpt2 batch_size=16, or model=out/<run>
Offline: train_file=ag_train.csv test_file=ag_test.csv (columns text,label) instead of data="ag_news"."""
model = "gpt2"
data = "ag_news"
max_len = 256  # headlines with a sentence or two: well under 256 GPT-2 tokens
epochs = 3
batch_size = 8  # reference: gpt2 classification batch 8 (distilgpt2: 16)
learning_rate = 2e-5
warmup_ratio = 0.1
weight_decay = 0.01
grad_clip = 1.0
dropout = 0.1
label_smoothing = 0.1  # reference, regularization: "Label smoothing (classification only): 0.1"
freeze_backbone_epochs = 1
