// The dashboard in headless Chromium, driven by playwright-core: the page
// shows both executors, and when one agent stops (SIGTERM, sent from here)
// it shows that executor go offline through the live feed and its
// changefeeds move to the other one.
//
// Run by tests/dashboard.rs, which starts the server and the agents:
//   node dashboard.mjs <server-url> <agent-to-stop-pid> <agent-to-stop-name> \
//        <other-agent-name> <changefeeds> [screenshot.png]
// Environment: FLOTILLA_CHROMIUM (default /usr/bin/chromium).
// Exit 0 when everything was seen; otherwise 1 with what was missing.

import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, stopPid, stopName, keepName, feedCount, screenshot] = process.argv.slice(2);
if (!feedCount) {
  console.error("usage: dashboard.mjs URL PID STOP_NAME KEEP_NAME CHANGEFEEDS [SCREENSHOT]");
  process.exit(2);
}
const total = Number(feedCount);
const executablePath = process.env.FLOTILLA_CHROMIUM || "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  console.error(`no Chromium at ${executablePath}: run scripts/install-deps (Debian package chromium)`);
  process.exit(1);
}

const started = Date.now();
const step = (what) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${what}`);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let page;
const problems = [];
try {
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  // Probes are polled: each must answer at once, not wait for its element.
  page.setDefaultTimeout(1000);
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  await page.goto(`${url}/?refresh=500`);
  step("page loaded");

  const row = (name) => page.locator(`#executors tr[data-name="${name}"]`);
  const status = (name) => row(name).getAttribute("data-status");

  // Both executors, running, with their labels, and the feed live.
  await waitFor("both executors running", async () =>
    (await status(stopName)) === "running" && (await status(keepName)) === "running");
  await waitFor("the live feed connected", async () =>
    (await page.locator("#feed").getAttribute("data-state")) === "live");
  await waitFor("the leader shown", async () => {
    const leader = await page.locator("#leader").textContent();
    return leader !== "-" && leader !== "none elected" ? leader : null;
  });
  const stopId = await row(stopName).getAttribute("data-executor-id");
  const keepId = await row(keepName).getAttribute("data-executor-id");
  for (const [name, id] of [[stopName, stopId], [keepName, keepId]]) {
    expect(`${name}'s label`, (await row(name).textContent()).includes(`agent=${name}`));
    expect(`${name}'s id`, id.startsWith(`${name}-`));
  }
  step(`executors ${stopId}, ${keepId} running`);

  // Every changefeed assigned, on both executors, with a checkpoint lag.
  const feeds = () =>
    page.locator("#changefeeds tbody tr").evaluateAll((rows) =>
      rows.map((r) => ({
        id: r.dataset.changefeed,
        executor: r.dataset.executor,
        state: r.dataset.state,
        lag: r.querySelector(".lag").textContent,
      })));
  const before = await waitFor("changefeeds on both executors", async () => {
    const all = await feeds();
    const on = (id) => all.filter((f) => f.executor === id).length;
    return all.length === total && on(stopId) > 0 && on(stopId) + on(keepId) === total ? all : null;
  });
  for (const feed of before) {
    expect(`${feed.id} is normal`, feed.state === "normal");
    expect(`${feed.id} shows a lag (${feed.lag})`, /^\d/.test(feed.lag));
  }
  const moving = before.filter((f) => f.executor === stopId).map((f) => f.id);
  // The executor's own row lists what it runs.
  await waitFor(`${stopName}'s row lists its changefeeds`, async () => {
    const text = await row(stopName).locator(".assigned").textContent();
    return moving.every((id) => text.includes(id));
  });
  await waitFor("heartbeat ages shown", async () =>
    /ago$/.test(await row(keepName).locator(".heartbeat").textContent()));
  step(`${moving.length} changefeeds on ${stopId}: ${moving.join(", ")}`);

  // Stop one agent: it deregisters; the feed says so at once.
  process.kill(Number(stopPid), "SIGTERM");
  step(`SIGTERM to ${stopName} (pid ${stopPid})`);
  await waitFor(`${stopName} offline`, async () => (await status(stopName)) === "offline");
  const reason = await row(stopName).locator(".reason").textContent();
  expect(`offline because deregistered (${reason})`, reason.trim() === "deregistered");
  expect(`${keepName} still running`, (await status(keepName)) === "running");
  step(`${stopId} offline (${reason.trim()})`);

  await waitFor(`changefeeds moved to ${keepName}`, async () => {
    const all = await feeds();
    return all.length === total && all.every((f) => f.executor === keepId);
  });
  await waitFor(`${keepName}'s row lists every changefeed`, async () =>
    Number(await row(keepName).locator(".assigned").getAttribute("data-count")) === total);
  step(`all ${total} changefeeds on ${keepId}`);
} catch (e) {
  problems.push(e.message);
} finally {
  if (page && screenshot) {
    await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  }
  await browser.close();
}
if (problems.length) {
  console.error(`dashboard test FAILED:\n  ${problems.join("\n  ")}`);
  process.exit(1);
}
step("dashboard test passed");

function expect(what, ok) {
  if (!ok) throw new Error(`expected ${what}`);
}

// Polls `probe` every 100 ms until it returns something truthy (returned),
// for at most 15 s; then fails naming `what` with the page's tables.
async function waitFor(what, probe) {
  const deadline = Date.now() + 15000;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > deadline) {
      const tables = await page.locator("main").innerText().catch(() => "(no page)");
      const error = await page.locator("#error").innerText().catch(() => "");
      throw new Error(`${what}: not seen within 15 s (last: ${last})\n${error}\n${tables}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
