"""Support for tests and benchmarks, not part of the product (no stage imports it).

- `ham10000`: small corpora, caption sets, stand-in synthetic sets and HAM-layout folders built
  from the real HAM10000 images;
- `sources`: small source folders in each corpus reader's layout (with broken rows);
- `adapters`: random LoRA adapter folders and a pipeline with adapters loaded;
- `ray_cluster`: a multi-node Ray cluster of `ray start` processes on loopback;
- `serve`: the synthesis service on loopback, ready when yielded;
- `html_render`: what headless Chromium rendered of an HTML page.
Modules import Ray and torch inside functions only, so importing them stays light.
"""
