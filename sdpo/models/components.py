"""Names of diffusers pipeline components, importable without torch or diffusers."""

# what encodes images and prompts: training from a latent cache loads none of these
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                      "tokenizer_3", "image_encoder", "feature_extractor", "safety_checker")
