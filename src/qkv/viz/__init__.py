"""Seeing attention: the explainer, plots and views."""

# Modules, imported by name rather than here so that `import qkv.viz` does not need matplotlib:
# explain (the formula step by step), heatmap and alignment (matplotlib figures; the only ones that need it),
# rollout (attention rollout), bertviz_export (bertviz's head_view format), html_view (a self-contained page).
