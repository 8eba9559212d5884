"""Stage 1, the character-aware LDM (paper §3.2).

fuser.py      name token + character image → fused token (eq. 1)
encoders.py   CLIP text/vision, the unconditional / text-only / fused conditioning
attention.py  capturing the supervised blocks' cross-attention probabilities
losses.py     L_reg (eq. 2–3) and the in-mask attention ratio
training.py   training maths shared by both stages (noise loss, LR warm-up)
data.py       record rows → a training batch
model.py      CharLDM: the parts, save/load, the training step
pipeline.py   CharLDMPipeline: sampling, fused embeddings, attention maps
logging_images.py  sample grids and attention figures for the training log
"""
