// Loom editor extension: when the editor opens, every custom-node pack that failed to load
// is shown in a toast naming what it lacks and how to fix it (the same line the server log
// has), so a missing pip requirement is seen without reading the console.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

async function reportPackErrors() {
  const reply = await api.fetchApi("/loom/custom_nodes");
  if (!reply.ok) return;
  const { failed } = await reply.json();
  for (const error of failed ?? []) {
    app.extensionManager?.toast?.add({
      severity: "warn",
      summary: `Custom nodes: ${error.pack}`,
      detail: error.summary || "failed to load; see the server log",
    });
  }
}

app.registerExtension({
  name: "loom.packErrors",
  async setup() {
    try {
      await reportPackErrors();
    } catch (error) {
      console.warn("loom.packErrors: could not read /loom/custom_nodes", error);
    }
  },
});
