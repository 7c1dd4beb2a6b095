// Numbers for people: byte and time formatting, PSNR between two rendered images, and a small SVG
// latency chart. No dependencies; the chart is built with DOM calls (no HTML strings from the server).

const SVG_NS = "http://www.w3.org/2000/svg";

export function formatBytes(bytes) {
  if (bytes == null || !Number.isFinite(bytes)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
}

/** "∞" for identical images, else the value in dB with two decimals. */
/** How /models measured peak memory, in words. */
export function memoryKind(kind) {
  if (!kind) return "";
  const words = { process_rss: "process RSS", cuda: "GPU", cuda_max_allocated: "GPU" };
  return words[kind] || kind.replace(/_/g, " ");
}

export function formatPsnr(value) {
  if (value == null) return "–";
  return value === Infinity ? "∞" : `${value.toFixed(2)} dB`;
}

/** The 8-bit RGBA pixels of a loaded <img> at its natural size. */
export function imagePixels(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

/**
 * PSNR of two ImageData over the R, G and B channels (alpha ignored): 10·log10(255² / MSE).
 * Infinity when identical; null when the sizes differ.
 */
export function psnr(a, b) {
  if (a.width !== b.width || a.height !== b.height) return null;
  const pa = a.data;
  const pb = b.data;
  let sum = 0;
  for (let i = 0; i < pa.length; i += 4) {
    const dr = pa[i] - pb[i];
    const dg = pa[i + 1] - pb[i + 1];
    const db = pa[i + 2] - pb[i + 2];
    sum += dr * dr + dg * dg + db * db;
  }
  const mse = sum / (a.width * a.height * 3);
  if (mse === 0) return Infinity;
  return 10 * Math.log10((255 * 255) / mse);
}

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

/**
 * A bar chart of one variant's observed latencies with the server's p50/p95 as dashed lines.
 * `samples`: [{inference_s, queue_wait_s}] oldest first; `latency`: the /models latency object.
 */
export function latencyChart(variant, samples, latency) {
  const width = 260;
  const height = 120;
  const pad = { left: 6, right: 66, top: 12, bottom: 18 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const p50 = latency?.inference_p50_s ?? null;
  const p95 = latency?.inference_p95_s ?? null;
  const tops = samples.map((s) => (s.inference_s || 0) + (s.queue_wait_s || 0));
  const max = Math.max(1e-3, ...tops, p50 || 0, p95 || 0) * 1.1;
  const y = (v) => pad.top + plotH - (v / max) * plotH;

  const last = samples.length ? samples[samples.length - 1] : null;
  const summary = [
    `${variant}: ${samples.length} job${samples.length === 1 ? "" : "s"} observed on this page`,
    last ? `last inference ${formatSeconds(last.inference_s)}, queue wait ${formatSeconds(last.queue_wait_s)}` : null,
    `server inference p50 ${formatSeconds(p50)}, p95 ${formatSeconds(p95)}`,
  ].filter(Boolean).join("; ");

  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary, class: "chart",
    preserveAspectRatio: "xMidYMid meet",
  });
  root.appendChild(svg("title", {}, summary));
  root.appendChild(svg("line", {
    x1: pad.left, x2: pad.left + plotW, y1: pad.top + plotH, y2: pad.top + plotH, class: "axis",
  }));
  const shown = samples.slice(-20);
  const slot = plotW / Math.max(shown.length, 8);
  shown.forEach((s, i) => {
    const x = pad.left + i * slot + slot * 0.15;
    const w = slot * 0.7;
    const inf = s.inference_s || 0;
    const wait = s.queue_wait_s || 0;
    const bar = svg("rect", { x, width: w, y: y(inf), height: Math.max(0.5, y(0) - y(inf)), class: "bar-inference" });
    bar.appendChild(svg("title", {}, `inference ${formatSeconds(inf)}`));
    root.appendChild(bar);
    if (wait > 0) {
      const top = svg("rect", { x, width: w, y: y(inf + wait), height: y(inf) - y(inf + wait), class: "bar-wait" });
      top.appendChild(svg("title", {}, `queue wait ${formatSeconds(wait)}`));
      root.appendChild(top);
    }
  });
  for (const [label, value] of [["p50", p50], ["p95", p95]]) {
    if (value == null) continue;
    root.appendChild(svg("line", {
      x1: pad.left, x2: pad.left + plotW, y1: y(value), y2: y(value), class: `ref ref-${label}`,
    }));
    root.appendChild(svg("text", {
      x: pad.left + plotW + 4, y: y(value) + (label === "p95" ? -2 : 10), class: "ref-label",
    }, `${label} ${formatSeconds(value)}`));
  }
  root.appendChild(svg("text", { x: pad.left, y: height - 4, class: "axis-label" },
    shown.length ? `${shown.length} recent job${shown.length === 1 ? "" : "s"}` : "no jobs yet"));
  root.appendChild(svg("text", { x: pad.left + plotW, y: height - 4, class: "axis-label", "text-anchor": "end" },
    `max ${formatSeconds(max / 1.1)}`));
  return root;
}
