"""Shared CIFAR setting of the PyTorch SupContrast reference (HobbitLong).

ResNet-50 with the CIFAR stem, head 2048-ReLU-128 without BN, batch 1024,
SGD momentum 0.9 lr 0.5 (no batch scaling), wd 1e-4, 10 warm-up epochs +
cosine, 1000 epochs, crops of area 0.2-1, colour jitter 0.4/0.4/0.4/0.1
(strength 0.5) with p 0.8, grayscale p 0.2, no blur, and the reference's
loss scaling tau / 0.07.
"""

from configs import common


def cifar_config(dataset: str, method: str, epochs: int):
  config = common.base_config()
  config.model.update(depth=50, width=1.0, cifar_stem=True)
  config.model.head.update(hidden_dims=(2048,), out_dim=128, use_bn=False)
  config.input.update(dataset=dataset, batch_size=1024, image_size=32,
                      shuffle_buffer=50_000)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.0,
                                               crop_area_min=0.2)
  config.optim.update(name="sgd", lr=0.5, lr_scaling="none",
                      weight_decay=1e-4, warmup_epochs=10)
  config.total_epochs = float(epochs)
  if method == "simclr":
    config.loss.update(name="simclr", temperature=0.5, use_labels=False)
  else:
    config.loss.update(name="supcon", temperature=0.1, use_labels=True)
    config.loss.kwargs = dict(variant="out", contrast_mode="all",
                              base_temperature=0.07)
  config.linear_eval.update(enabled=True, protocol="supcontrast",
                            train_split="train", test_split="test",
                            batch_size=1000)
  config.online_eval.every_steps = 4800  # About every 100 epochs.
  return config
