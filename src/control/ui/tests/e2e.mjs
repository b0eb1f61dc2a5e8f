// End-to-end test of the admin UI in headless Chromium (playwright-core), against a running
// syncbridge that tests/ui.rs starts on the real stack and emulator and prepares: a parked
// conflict on key SB_CONFLICT_KEY, one dead letter, an orphaned item (drift), more rows than a
// ledger page, a write workload, a pulled list SB_LIST.
//
// Env: SB_URL (http://127.0.0.1:port), SB_TOKEN (operate), SB_READ_TOKEN (read), SB_PIPELINE,
// SB_TABLE (schema.table), SB_KEY (a row with history), SB_CONFLICT_KEY, SB_LIST, CHROMIUM
// (executable), OUT_DIR (screenshots; default ./test-output).
// Fails (exit 1) on any failed step and on any browser console error or page error.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set (tests/ui.rs sets it)`);
  return v;
};
const BASE = env("SB_URL");
const PIPELINE = env("SB_PIPELINE");
const OUT = env("OUT_DIR", new URL("../test-output/", import.meta.url).pathname);
mkdirSync(OUT, { recursive: true });

/** Budget for the first load of /ui, gzip-compressed (issue 16). */
const FIRST_LOAD_BUDGET = 300 * 1024;
/** Generous bound for a UI update after an action (the server side may flush a batch first). */
const WAIT = 45_000;

const consoleErrors = [];
// Only while a step expects the API to refuse (a wrong token) or to be unreachable, the browser's
// own log line for that failed request is expected; anything else is an error of the test.
let expectRefusal = false;
const REFUSAL_LOGS = ["status of 401", "net::ERR_FAILED"];
// While a step expects the API to answer this status (a draft with problems: 422), the browser's
// log line for it is expected too.
let expectStatus;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function shot(page, name) {
  const file = join(OUT, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`  screenshot ${file}`);
}

async function step(name, f) {
  const t = Date.now();
  console.log(`step: ${name}`);
  await f();
  console.log(`  ok (${Date.now() - t} ms)`);
}

/** Bytes of /ui's first load as sent gzip-compressed: the page and every asset it names. */
async function firstLoadBytes() {
  const get = async (path) => {
    const r = await fetch(`${BASE}${path}`, { headers: { "accept-encoding": "gzip" } });
    check(r.ok, `GET ${path}: ${r.status}`);
    const len = Number(r.headers.get("content-length"));
    check(Number.isFinite(len) && len > 0, `content-length of ${path}`);
    return { len, enc: r.headers.get("content-encoding"), text: await r.text() };
  };
  const index = await get("/ui/");
  const assets = [...index.text.matchAll(/(?:src|href)="(\/ui\/assets\/[^"]+)"/g)].map((m) => m[1]);
  check(assets.length >= 2, `index.html names its script and style: ${assets}`);
  let total = index.len;
  for (const a of assets) {
    const r = await get(a);
    check(r.enc === "gzip", `${a} is sent gzip-compressed`);
    total += r.len;
  }
  return total;
}

async function signIn(page, token) {
  await page.goto(`${BASE}/ui/`);
  await page.getByLabel("API token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
}

async function countOf(page, name) {
  const text = await page.getByTestId(`pipeline-${PIPELINE}`).getByTestId(`count-${name}`).innerText();
  return Number(text.replace(/[^0-9.]/g, ""));
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM"),
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    if (expectRefusal && REFUSAL_LOGS.some((t) => m.text().includes(t))) return;
    if (expectStatus && m.text().includes(`status of ${expectStatus}`)) return;
    consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(`page error: ${e.message}`));

  try {
    await step("first load is within budget", async () => {
      const bytes = await firstLoadBytes();
      console.log(`  first load of /ui: ${bytes} bytes gzip (budget ${FIRST_LOAD_BUDGET})`);
      check(bytes < FIRST_LOAD_BUDGET, `first load ${bytes} B < ${FIRST_LOAD_BUDGET} B`);
    });

    await step("a wrong token is refused with a clear message", async () => {
      expectRefusal = true;
      await signIn(page, "not-a-token");
      await page.getByTestId("signin-error").getByText("This token was refused").waitFor();
      expectRefusal = false;
      await shot(page, "01-signin-refused");
      check(!page.url().includes("not-a-token"), "the token is never in the URL");
    });

    await step("an unreachable API is said so", async () => {
      expectRefusal = true;
      // As if the process were down: every API call fails at the network level.
      await page.route("**/whoami", (r) => r.abort("failed"));
      await signIn(page, env("SB_TOKEN"));
      await page.getByTestId("signin-error").getByText("cannot be reached").waitFor();
      await page.unroute("**/whoami");
      expectRefusal = false;
      await shot(page, "01b-signin-unreachable");
    });

    await step("a read token sees data but no actions", async () => {
      await signIn(page, env("SB_READ_TOKEN"));
      await page.getByTestId("who").getByText("(read)").waitFor();
      await page.goto(`${BASE}/ui/dlq?pipeline=${PIPELINE}`);
      await page.getByTestId("dlq-pending").waitFor();
      await page.getByText("Read-only token").waitFor();
      check((await page.getByRole("button", { name: /Replay/ }).count()) === 0, "no replay button for read");
      await page.goto(`${BASE}/ui/conflicts?pipeline=${PIPELINE}`);
      await page.getByTestId("conflict").first().waitFor();
      check((await page.getByRole("button", { name: /Keep/ }).count()) === 0, "no resolve button for read");
      await shot(page, "02-read-only-conflicts");
      await page.goto(`${BASE}/ui/mapping?pipeline=${PIPELINE}`);
      await page.getByTestId("field-Title").waitFor();
      check((await page.getByRole("button", { name: "Add field" }).count()) === 0, "no add-field form for read");
      check(await page.getByRole("textbox", { name: /^YAML/ }).getAttribute("readonly") !== null, "the YAML is read-only for read");
      await page.getByRole("button", { name: "Sign out" }).click();
    });

    await step("sign in (operate) and see the pipeline's counts move", async () => {
      await signIn(page, env("SB_TOKEN"));
      await page.getByTestId("who").getByText("(operate)").waitFor();
      check(!page.url().includes(env("SB_TOKEN")), "the token is never in the URL");
      const card = page.getByTestId(`pipeline-${PIPELINE}`);
      await card.getByText("running").waitFor();
      await card.getByTestId("count-slot-lag").getByText(/\d B$|iB$/).waitFor();
      const before = await countOf(page, "events");
      const deadline = Date.now() + WAIT;
      let after = before;
      while (after <= before && Date.now() < deadline) {
        await page.waitForTimeout(500);
        after = await countOf(page, "events");
      }
      console.log(`  events ${before} -> ${after}`);
      check(after > before, `the events count moved (${before} -> ${after})`);
      await shot(page, "03-overview");
    });

    await step("run history: filter and open a run", async () => {
      await page.getByRole("link", { name: "Runs" }).first().click();
      await page.getByRole("heading", { name: "Runs" }).waitFor();
      const focus = await page.evaluate(() => document.activeElement?.id);
      check(focus === "main", `after navigating, focus is on the content, not on ${focus}`);
      await page.getByLabel("Kind").selectOption("stream");
      const first = page.locator("tbody tr a").first();
      await first.waitFor();
      await shot(page, "04-runs");
      await first.click();
      await page.getByRole("heading", { name: /^Run / }).waitFor();
      await page.getByRole("heading", { name: "Counts" }).waitFor();
      await shot(page, "05-run-detail");
    });

    await step("a row's lineage", async () => {
      await page.getByRole("link", { name: "Row lineage" }).click();
      await page.getByLabel("Table").fill(env("SB_TABLE"));
      await page.getByLabel("Key").fill(env("SB_KEY"));
      await page.getByRole("button", { name: "Show lineage" }).click();
      const steps = page.getByTestId("lineage").locator("li");
      await steps.first().waitFor();
      check((await steps.count()) >= 1, "at least one lineage entry");
      await page.getByTestId("lineage").getByText("create").first().waitFor();
      await shot(page, "06-lineage");
    });

    await step("resolve a parked conflict (both values side by side)", async () => {
      await page.getByRole("link", { name: "Conflicts" }).click();
      const card = page.getByTestId("conflict").filter({ hasText: `key ${env("SB_CONFLICT_KEY")}` });
      await card.waitFor();
      await card.getByTestId("source-value").getByText("db side").waitFor();
      await card.getByTestId("target-value").getByText("list side").waitFor();
      await shot(page, "07-conflict");
      await card.getByRole("button", { name: "Keep database values" }).click();
      await page.getByTestId("conflict-notice").getByText("kept the database's values").waitFor();
      await shot(page, "08-conflict-resolved");
    });

    await step("replay a dead letter", async () => {
      await page.getByRole("link", { name: "Dead letters" }).click();
      await page.getByTestId("dlq-pending").getByText(/^[1-9]\d* pending/).waitFor();
      await page.getByText("graph_rejected").first().waitFor();
      await shot(page, "09-dlq");
      await page.getByRole("button", { name: /^Replay \d+ dead letter/ }).click();
      await page.getByRole("button", { name: "Replay now" }).click();
      await page.getByTestId("dlq-replayed").waitFor();
      await shot(page, "10-dlq-replayed");
    });

    await step("drift dry run, then heal after confirming", async () => {
      await page.getByRole("link", { name: "Drift" }).click();
      await page.getByRole("button", { name: "Check for drift (dry run)" }).click();
      const report = page.getByTestId("drift-report");
      await report.getByRole("heading", { name: /^Check of / }).waitFor();
      const orphaned = Number(await page.getByTestId("drift-orphaned").innerText());
      check(orphaned >= 1, `the dry run finds the orphaned item (${orphaned})`);
      await shot(page, "11-drift");
      await page.getByRole("button", { name: "Heal…" }).click();
      await page.getByRole("group", { name: "Confirm heal" }).waitFor();
      await shot(page, "11b-drift-confirm-heal");
      await page.getByRole("button", { name: "Heal now" }).click();
      await report.getByRole("heading", { name: /^Heal of / }).waitFor();
      await report.getByText(/^Healed: /).waitFor();
      await shot(page, "11c-drift-healed");
    });

    await step("reset a delta link: dry run first, then confirm", async () => {
      await page.getByRole("link", { name: "Cursors" }).click();
      await page.getByRole("button", { name: `Reset delta link of ${env("SB_LIST")}` }).click();
      const plan = page.getByTestId("reset-plan");
      await plan.getByText("Nothing has changed yet").waitFor();
      await plan.getByTestId("radius-items-reenumerated").waitFor();
      await shot(page, "12-cursor-dry-run");
      await plan.getByRole("button", { name: "Confirm reset" }).click();
      await page.getByTestId("reset-done").waitFor();
      await shot(page, "13-cursor-reset");
    });

    await step("reset a consumer group's offsets: dry run (blast radius) first, then confirm", async () => {
      // The dead-letter replay group (the letter was replayed): to earliest, it would read the
      // dead letters again at the next replay; nothing else moves.
      await page.getByRole("button", { name: "Reset dlq-replay to earliest" }).click();
      const plan = page.getByTestId("reset-plan");
      await plan.getByText("move consumer group dlq-replay to earliest").waitFor();
      await plan.getByText("Nothing has changed yet").waitFor();
      const reread = Number(await plan.getByTestId("radius-events-reread").innerText());
      check(reread >= 1, `the blast radius counts the dead letter read again (${reread})`);
      await shot(page, "13b-group-dry-run");
      await plan.getByRole("button", { name: "Confirm reset" }).click();
      await page.getByTestId("reset-done").waitFor();
      check((await plan.count()) === 0, "the plan is gone once confirmed");
      await shot(page, "13c-group-reset");
    });

    await step("inventory and catalog", async () => {
      await page.getByRole("link", { name: "Inventory" }).click();
      await page.getByRole("button", { name: /^Show catalog of / }).first().click();
      await page.getByTestId("catalog").locator("tbody tr").first().waitFor();
      await shot(page, "14-inventory");
    });

    await step("the ledger of a list, a page at a time", async () => {
      await page.getByRole("link", { name: "Ledger" }).click();
      await page.getByLabel("List").selectOption({ label: env("SB_LIST") });
      const total = page.getByTestId("ledger-total");
      await total.getByText(`in list ${env("SB_LIST")}`).waitFor();
      const rows = Number((await total.innerText()).match(/^(\d+) row/)?.[1]);
      check(rows >= 5, `the ledger knows the list's items (${rows})`);
      // The conflict's row: its item, the hash of its last confirmed write, nothing pending.
      const row = page.locator(`[data-testid="ledger-row"][data-key="${env("SB_CONFLICT_KEY")}"]`);
      await row.waitFor();
      const cells = await row.locator("td").allInnerTexts();
      check(cells[0] === env("SB_TABLE") && cells[2] !== "–" && cells[3] !== "–", `row ${cells}`);
      await shot(page, "15-ledger");
      check(rows > 50, `more rows than one page (${rows})`);
      await page.getByRole("button", { name: "Next page" }).click();
      await total.getByText("from row 51").waitFor();
      check(!(await row.isVisible()), "page 2 holds other rows");
      const second = await page.getByTestId("ledger-row").count();
      check(second >= 1 && second <= 50, `page 2 holds the rest, at most a page (${second})`);
      await shot(page, "15b-ledger-page-2");
      await page.getByRole("button", { name: "Previous page" }).click();
      await row.waitFor();
    });

    await step("mapping editor: add a field, see the diff, save and reload", async () => {
      await page.getByRole("link", { name: "Mapping" }).click();
      await page.getByTestId("column-note").waitFor();
      await page.getByTestId("field-Title").waitFor();
      await page.getByRole("combobox", { name: /^Column/ }).selectOption("note");
      await page.getByRole("textbox", { name: /^Field name/ }).fill("Note");
      await page.getByRole("combobox", { name: /^Field type/ }).selectOption("note");
      await page.getByRole("combobox", { name: /^Direction/ }).selectOption("push_only");
      await page.getByRole("button", { name: "Add field" }).click();
      const diff = page.getByTestId("yaml-diff");
      await diff.locator(".add").getByText("note: { field: Note, type: note, direction: push_only }").waitFor();
      check((await diff.locator(".del").count()) === 0, "adding a field removes no line");
      const yaml = await page.getByRole("textbox", { name: /^YAML/ }).inputValue();
      check(!yaml.includes(env("SB_TOKEN")) && yaml.includes("<redacted:"), "the tokens are redacted in the editor");
      await shot(page, "16-mapping-diff");
      await page.getByRole("button", { name: "Save and reload" }).click();
      await page.getByTestId("mapping-saved").getByText("reload applied").waitFor();
      await page.getByTestId("field-Note").waitFor();
      await shot(page, "17-mapping-saved");
    });

    await step("mapping editor: a change with problems is shown beside the field and cannot be saved", async () => {
      const yamlBox = page.getByRole("textbox", { name: /^YAML/ });
      const saved = await yamlBox.inputValue();
      expectStatus = 422;
      // A number field cannot hold the text column `title` (catalog), and the list's Title is a
      // text column (live list).
      await page.getByRole("combobox", { name: "Title type" }).selectOption("number");
      const problems = page.getByTestId("check-problems");
      await problems.getByText(/problem\(s\): fix them to save/).waitFor();
      await problems.getByText(/catalog: .*title is text/).waitFor();
      await page.getByTestId("field-problems-Title").getByText(/cannot hold it/).waitFor();
      check(await page.getByRole("button", { name: "Save and reload" }).isDisabled(), "save is blocked");
      await shot(page, "18-mapping-problems");
      await page.getByRole("button", { name: "Discard changes" }).click();
      await page.getByTestId("yaml-diff").waitFor({ state: "detached" });
      expectStatus = undefined;
      check((await yamlBox.inputValue()) === saved, "nothing changed");
    });

    await step("mapping editor: remove a field and save", async () => {
      await page.getByRole("button", { name: "Remove field Link" }).click();
      const diff = page.getByTestId("yaml-diff");
      await diff.locator(".del").getByText("link: { field: Link, type: hyperlink }").waitFor();
      check((await diff.locator(".add").count()) === 0, "removing a field adds no line");
      check((await page.getByTestId("field-Link").count()) === 0, "the form no longer shows Link");
      await page.getByTestId("check-ok").waitFor();
      await shot(page, "19-mapping-remove-diff");
      await page.getByRole("button", { name: "Save and reload" }).click();
      await page.getByTestId("mapping-saved").getByText("reload applied").waitFor();
      await page.getByTestId("field-Title").waitFor();
      check((await page.getByTestId("field-Link").count()) === 0, "Link is gone after the reload");
      await shot(page, "20-mapping-removed");
    });

    await step("keyboard and a narrow window", async () => {
      await page.goto(`${BASE}/ui/?pipeline=${PIPELINE}`);
      await page.getByTestId(`pipeline-${PIPELINE}`).waitFor();
      await page.keyboard.press("Tab");
      const focused = await page.evaluate(() => document.activeElement?.textContent);
      check(focused === "Skip to content", `first Tab reaches the skip link, not ${focused}`);
      await page.keyboard.press("Enter");
      const target = await page.evaluate(() => document.activeElement?.id);
      check(target === "main", `the skip link moves focus to the content, not to ${target}`);
      await page.setViewportSize({ width: 390, height: 800 });
      await page.waitForTimeout(300);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      check(overflow <= 0, `no horizontal scrolling at 390 px (${overflow} px too wide)`);
      await shot(page, "21-narrow-overview");
    });

    await step("every screen in a 420×800 window", async () => {
      await page.setViewportSize({ width: 420, height: 800 });
      const screens = [
        ["", () => page.getByTestId(`pipeline-${PIPELINE}`)],
        ["runs", () => page.getByRole("heading", { name: "Runs", level: 1 })],
        ["lineage", () => page.getByRole("button", { name: "Show lineage" })],
        ["conflicts", () => page.getByRole("heading", { name: "Conflicts", level: 1 })],
        ["dlq", () => page.getByTestId("dlq-pending")],
        ["drift", () => page.getByRole("button", { name: "Check for drift (dry run)" })],
        ["ledger", () => page.getByTestId("ledger-total")],
        ["mapping", () => page.getByTestId("field-Title")],
        ["cursors", () => page.getByRole("heading", { name: "Replication slot" })],
        ["inventory", () => page.getByRole("heading", { name: "Inventory", level: 1 })],
      ];
      for (const [path, ready] of screens) {
        await page.goto(`${BASE}/ui/${path}?pipeline=${PIPELINE}`);
        await ready().waitFor();
        await page.waitForTimeout(200);
        await shot(page, `22-narrow-${path || "overview"}`);
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        check(overflow <= 0, `no horizontal scrolling of /ui/${path} at 420 px (${overflow} px too wide)`);
      }
    });
  } finally {
    await browser.close();
  }
  if (consoleErrors.length) {
    throw new Error(`browser console errors:\n${consoleErrors.join("\n")}`);
  }
  console.log("e2e: all steps passed, no console error");
}

main().catch((e) => {
  console.error(`e2e FAILED: ${e.stack ?? e}`);
  process.exit(1);
});
