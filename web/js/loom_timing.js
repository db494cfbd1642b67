// Loom editor extension: after a run, every node shows in its title bar how long it took
// ("0.42s") or that its output came from the cache ("cached"). Times are measured in the
// browser from the WebSocket events: a node runs from its `executing` message until the next
// `executing` (or the end of the prompt). The label lives on `node.loom_timing`, a plain field
// that is not saved with the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LABEL_COLOR = "#9fd39f";
const CACHED_COLOR = "#8fa9c9";

function formatSeconds(seconds) {
  if (seconds < 10) return `${seconds.toFixed(2)}s`;
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes}m ${Math.round(seconds - minutes * 60)}s`;
}

// Node ids arrive as strings ("3", or "5:3" inside subgraphs); unknown ids give null.
function findNode(id) {
  const graph = app.graph;
  if (graph == null || id == null) return null;
  const asNumber = Number(id);
  return graph.getNodeById(Number.isNaN(asNumber) ? id : asNumber) ?? graph.getNodeById(id) ?? null;
}

function redraw() {
  app.graph?.setDirtyCanvas?.(true, false);
}

class RunTimer {
  constructor() {
    this.current = null;
    this.startedAt = 0;
  }

  reset() {
    this.current = null;
    for (const node of app.graph?._nodes ?? []) delete node.loom_timing;
    redraw();
  }

  markCached(ids) {
    for (const id of ids ?? []) {
      const node = findNode(id);
      if (node) node.loom_timing = { text: "cached", cached: true, seconds: 0 };
    }
    redraw();
  }

  start(id) {
    this.finish();
    if (id == null) return;
    this.current = String(id);
    this.startedAt = performance.now();
  }

  finish() {
    if (this.current == null) return;
    const seconds = (performance.now() - this.startedAt) / 1000;
    const node = findNode(this.current);
    if (node) node.loom_timing = { text: formatSeconds(seconds), cached: false, seconds };
    this.current = null;
    redraw();
  }
}

function drawLabel(node, ctx) {
  const timing = node.loom_timing;
  if (!timing || node.flags?.collapsed) return;
  const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillStyle = timing.cached ? CACHED_COLOR : LABEL_COLOR;
  ctx.fillText(timing.text, node.size[0] - 8, -titleHeight / 2);
  ctx.restore();
}

const timer = new RunTimer();

app.registerExtension({
  name: "loom.NodeTiming",

  async setup() {
    api.addEventListener("execution_start", () => timer.reset());
    api.addEventListener("execution_cached", (event) => timer.markCached(event.detail?.nodes));
    api.addEventListener("executing", (event) => timer.start(event.detail));
    for (const end of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(end, () => timer.finish());
    }
  },

  async beforeRegisterNodeDef(nodeType) {
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = original?.call(this, ctx, ...rest);
      drawLabel(this, ctx);
      return result;
    };
  },
});
