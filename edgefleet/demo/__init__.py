"""Demo assets: pretrained models, real photos, preprocessing and ImageNet labels."""
