"""The models bench_architectures.py measures, built offline with random weights (float32, seed 0):

* ``resnet18``: a ResNet-18-shaped CNN for CIFAR-sized inputs (3 x 32 x 32): a 3x3 stem, four stages of two
  BasicBlocks with BatchNorm (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pooling, 10 classes. The
  torchvision ResNet-18 is w = 64 (11.2M parameters); here w = 20 (1.1M), so that a 100-probe trace takes
  seconds, not minutes, on 2 cores.
* ``vit``: a small Vision Transformer (Hugging Face ViTForImageClassification from a config): 32 x 32 images in
  4 x 4 patches (64 tokens and a class token), width 192, 3 layers, 3 heads, MLP 384, 10 classes (1.0M).
* ``bert``: a BERT-style encoder (BertForSequenceClassification from a config): vocabulary 2000, width 256,
  2 layers, 4 heads, intermediate 512, sequences of 64 tokens with padding, 2 classes (1.6M).

``batch(name, n)`` is n examples as users have them -- (images, labels), or a tokenizer-style mapping with
"labels" -- and ``peer_view(name, model)`` the same model as a module PyHessian and curvlinops can call on one
tensor (they take ``model(x)`` and a logits tensor).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 20
CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, width=WIDTH, classes=CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, inputs = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2 ** i
            stages += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def build(name):
    """The model, float32, eval mode, seed 0; BatchNorm statistics from a pass over random images (as after
    training, not the identity)."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = ResNet18()
        with torch.no_grad():  # running statistics of real activations, then frozen by eval mode
            model.train()
            for _ in range(3):
                model(torch.randn(64, 3, 32, 32))
        return model.eval()
    import transformers

    if name == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192,
                                        num_hidden_layers=3, num_attention_heads=3, intermediate_size=384,
                                        num_labels=CLASSES)
        return transformers.ViTForImageClassification(config).eval()
    if name == "bert":
        config = transformers.BertConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=512, max_position_embeddings=64, num_labels=2)
        return transformers.BertForSequenceClassification(config).eval()
    raise KeyError(name)


def batch(name, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name in ("resnet18", "vit"):
        images = torch.randn(n, 3, 32, 32, generator=g)
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        return {"pixel_values": images, "labels": labels} if name == "vit" else (images, labels)
    ids = torch.randint(1, 2000, (n, 64), generator=g)
    lengths = torch.randint(16, 65, (n,), generator=g)
    mask = (torch.arange(64)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


class PeerView(nn.Module):
    """model(x) -> logits for the peers: for the Hugging Face models, x is the pixel values, or the token ids with
    the attention mask stacked behind them (one tensor, as PyHessian and curvlinops pass it on)."""

    def __init__(self, name, model):
        super().__init__()
        self.name, self.model = name, model

    def forward(self, x):
        if self.name == "vit":
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def peer_view(name, model, data):
    """(model, (inputs, targets)) for the peers: the same parameters and examples as flatfast's."""
    if name == "resnet18":
        return model, data
    inputs = data["pixel_values"] if name == "vit" else torch.stack([data["input_ids"], data["attention_mask"]], 1)
    return PeerView(name, model).eval(), (inputs, data["labels"])
