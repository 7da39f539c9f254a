"""
Curvature and the prior of a transformer
========================================

A BERT-style classifier built from a Hugging Face config (nothing downloaded), measured on the batches a tokenizer
and a data collator produce: mappings of token ids and attention masks with the targets under ``"labels"``. The
curvature calls take them as they are; ``params=`` restricts the Hessian to the classifier head, where the network
is piecewise linear and the trace is exact; and log P(f) uses the NNGP kernel of the architecture itself,
estimated by re-drawing every layer.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers

import flatfast

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32, num_labels=2)
model = transformers.BertForSequenceClassification(config)
print("parameters:", sum(p.numel() for p in model.parameters()))

generator = torch.Generator().manual_seed(1)
lengths = torch.randint(8, 25, (64,), generator=generator)
mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
ids = torch.randint(1, 500, (64, 24), generator=generator) * mask          # 0 is the padding token
labels = (ids[:, 0] % 2).long()                                          # a labelling the model can learn
batches = [{"input_ids": ids[i:i + 32], "attention_mask": mask[i:i + 32], "labels": labels[i:i + 32]}
           for i in (0, 32)]

# %%
# The whole Hessian: a Hutch++ estimate of the trace, the top eigenvalues. Attention runs on torch's math kernel
# during these passes (the fused kernels cannot be differentiated twice), and the model is measured in eval mode.
print(flatfast.hessian_trace(model, batches, method="hutch++", probes=30))
top = flatfast.hessian_eigenvalues(model, batches, k=2, tol=1e-3)
print("top eigenvalues", top.values, "in", top.iterations, "products; mode:", top.mode)

# %%
# The classifier head alone: the network is piecewise linear in it, so its trace is exact.
head = flatfast.hessian_trace(model, batches, params=model.classifier)
print(head)

# %%
# log P(f) under the architecture's own prior: the empirical NNGP kernel re-draws the linear maps from
# N(0, 2 / fan_in), N(0, 1) and every other layer (embeddings, LayerNorm) by the model's own initialiser.
inputs = {"input_ids": ids, "attention_mask": mask}
K, stderr = flatfast.empirical_nngp_kernel(model, inputs, kernel_samples=64, return_stderr=True)
print(f"kernel Monte Carlo error: {float((stderr / K.abs()).median()):.3f} of an entry (median)")
f = 2 * labels.numpy() - 1
print(f"log P(f) of the labels {flatfast.log_prior(inputs, f, kernel=K):.2f} nats; "
      f"of a random labelling {flatfast.log_prior(inputs, np.random.default_rng(0).choice([-1, 1], 64), kernel=K):.2f}")

# %%
fig, ax = plt.subplots(figsize=(4.5, 4))
image = ax.imshow(K.numpy(), cmap="viridis")
fig.colorbar(image, ax=ax, shrink=0.8)
ax.set_title("empirical NNGP kernel of the BERT-style encoder", fontsize=9)
fig.tight_layout()
