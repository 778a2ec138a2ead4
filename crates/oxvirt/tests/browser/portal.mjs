// Drives the oxvirt web admin portal in headless Chromium through a VM's life:
// log in, create a VM from Blank with a disk, make a template of it, create a VM from the
// template, start it, watch its status turn up (no reload), read its serial console, see it
// on the dashboard with charts, snapshot it, power it off through the confirmation dialog.
//
// Run by crates/oxvirt/tests/it/portal_browser.rs against a live `oxvirt up`. Environment:
//   OXVIRT_PORTAL    https://127.0.0.1:PORT (the engine; its certificate is self-signed)
//   OXVIRT_PASSWORD  admin@internal's password
//   OXVIRT_KERNEL, OXVIRT_INITRD, OXVIRT_CMDLINE   the test guest (direct kernel boot)
//   OXVIRT_SCREENS   directory for the screenshots
//   OXVIRT_CHROMIUM  the browser (default /usr/bin/chromium)
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`environment variable ${k} is required`);
  return v;
};
const base = env("OXVIRT_PORTAL");
const password = env("OXVIRT_PASSWORD");
const kernel = env("OXVIRT_KERNEL");
const initrd = env("OXVIRT_INITRD");
const cmdline = env("OXVIRT_CMDLINE");
const screens = env("OXVIRT_SCREENS");
mkdirSync(screens, { recursive: true });

const t0 = Date.now();
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s] ${m}`);
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const browser = await chromium.launch({
  executablePath: env("OXVIRT_CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1440, height: 960 } });
context.setDefaultTimeout(30_000);
const page = await context.newPage();
const pageErrors = [];
page.on("console", (m) => { if (m.type() === "error") pageErrors.push(m.text()); });
page.on("pageerror", (e) => pageErrors.push(String(e)));
const shot = async (name) => {
  await page.screenshot({ path: join(screens, name), fullPage: name === "dashboard.png" ? false : true });
  log(`screenshot ${name}`);
};
// A marker that survives only as long as the page is not reloaded.
const markPage = () => page.evaluate(() => { window.__oxvirtNoReload = true; });
const notReloaded = () => page.evaluate(() => window.__oxvirtNoReload === true);
const badge = (vmId) => page.locator(`[data-live="vm:${vmId}"]`).first();
const toastDone = (text) => page.locator("#toasts .toast.done", { hasText: text });
async function noFailedToast() {
  const failed = page.locator("#toasts .toast.failed");
  if (await failed.count()) throw new Error(`an action failed: ${await failed.first().innerText()}`);
}

try {
  // --- log in: the portal sends us to its login page; a wrong password is refused.
  await page.goto(`${base}/portal/`);
  await page.waitForURL(/\/portal\/login/);
  await page.fill("#login input[name=username]", "admin@internal");
  await page.fill("#login input[name=password]", "wrong-password");
  await page.click("#login button[type=submit]");
  await page.locator("#login-error").waitFor();
  check((await page.locator("#login-error").innerText()).includes("incorrect"), "a wrong password is refused");
  await page.fill("#login input[name=password]", password);
  await shot("login.png");
  await page.click("#login button[type=submit]");
  await page.waitForURL(`${base}/portal/`);
  await page.locator("h1", { hasText: "Dashboard" }).waitFor();
  check((await page.locator(".card-value[data-live-count=hosts_up]").innerText()) === "1 / 1", "one host up");
  log("logged in");
  pageErrors.length = 0; // the refused login's 401 is expected

  // --- a VM from Blank with a 16 MiB disk, then a template of it.
  await page.click("header nav a:text-is('VMs')");
  await page.waitForURL(/\/portal\/vms$/);
  await markPage();
  await page.click("#new-vm > summary");
  const f = page.locator("#new-vm form");
  await f.locator("input[name=name]").fill("base");
  await f.locator("select[name=template]").selectOption({ label: "Blank" });
  await f.locator("input[name=memory_mib]").fill("128");
  await f.locator("input[name=disk_mib]").fill("16");
  await f.locator("select[name=sd]").selectOption({ label: "data" });
  await f.locator("button[type=submit]").click();
  await page.locator("#vms a", { hasText: /^base$/ }).waitFor({ timeout: 60_000 });
  check(await notReloaded(), "the new VM appeared without a reload");
  await noFailedToast();
  log("VM base created");

  await page.click("#vms a:text-is('base')");
  await page.waitForURL(/\/portal\/vms\/[0-9a-f-]{36}$/);
  const tf = page.locator("form[action$='/template']");
  await tf.locator("input[name=name]").fill("tmpl");
  await tf.locator("button[type=submit]").click();
  await toastDone("Make template tmpl from VM base").waitFor({ timeout: 90_000 });
  log("template tmpl made");

  // --- create a VM from the template.
  await page.click("header nav a:text-is('Templates')");
  const trow = page.locator("#templates tbody tr", { hasText: "tmpl" });
  await trow.locator(".st", { hasText: "ok" }).waitFor();
  await trow.locator("a", { hasText: "New VM" }).click();
  await page.waitForURL(/template=/);
  const nf = page.locator("#new-vm form");
  check(await nf.isVisible(), "the new-VM form opens for the template");
  await nf.locator("input[name=name]").fill("web1");
  await nf.locator("input[name=kernel]").fill(kernel);
  await nf.locator("input[name=initrd]").fill(initrd);
  await nf.locator("input[name=cmdline]").fill(cmdline);
  await shot("new-vm-from-template.png");
  await nf.locator("button[type=submit]").click();
  const created = toastDone("Create VM web1");
  await created.waitFor({ timeout: 90_000 });
  log("VM web1 created from the template");
  await created.locator("a", { hasText: "open" }).click();
  await page.waitForURL(/\/portal\/vms\/[0-9a-f-]{36}$/);
  const vmId = page.url().split("/").pop();
  await page.locator("h1", { hasText: "VM web1" }).waitFor();
  check((await page.locator(".facts").innerText()).includes("tmpl"), "web1's template is tmpl");

  // --- start it and watch its status turn up without a reload.
  await markPage();
  check((await badge(vmId).innerText()) === "down", "web1 starts down");
  await page.locator(".toolbar button", { hasText: "Start" }).click();
  await badge(vmId).filter({ hasText: /^up$/ }).waitFor({ timeout: 90_000 });
  check(await notReloaded(), "the status turned up without a reload");
  await noFailedToast();
  log("web1 is up");
  check(await page.locator(".toolbar button", { hasText: "Power off" }).isVisible(), "Power off shows for a running VM");
  check(!(await page.locator(".toolbar button", { hasText: "Start" }).isVisible()), "Start hides for a running VM");
  await page.locator("#console", { hasText: "OXVIRT-MARKER portal" }).waitFor({ timeout: 60_000 });
  log("serial console shows the guest's marker");
  const vv = await page.request.get(new URL(`/portal/api/console.vv?vm=${vmId}`, page.url()).href);
  const vvText = await vv.text();
  check(vv.ok() && vvText.startsWith("[virt-viewer]\ntype=vnc\n") && /\npassword=\w{12}\n/.test(vvText),
        `the VNC console's remote-viewer file downloads (${vv.status()})`);
  log("VNC console file downloaded");
  await page.locator("figure[data-chart=vm][data-points]").waitFor({ timeout: 30_000 });
  await shot("vm-up.png");

  // --- the dashboard with the running VM and host charts.
  await page.click("header nav a:text-is('Dashboard')");
  await page.locator("#running-vms a", { hasText: /^web1$/ }).waitFor();
  check((await page.locator(".card-value[data-live-count=vms_running]").innerText()) === "1 / 2", "1 of 2 VMs run");
  await page.waitForFunction(() => {
    const f = document.querySelector("figure[data-chart=host]");
    return f && Number(f.dataset.points || 0) >= 3;
  }, null, { timeout: 45_000 });
  await page.waitForTimeout(500);
  await shot("dashboard.png");
  log("dashboard shows web1 and host charts");

  // --- snapshot it (live, the VM keeps running).
  await page.goto(`${base}/portal/vms/${vmId}`);
  await markPage();
  const sf = page.locator("form[action$='/snapshot']");
  await sf.locator("input[name=description]").fill("before-stop");
  await sf.locator("button[type=submit]").click();
  const snapRow = page.locator("#vm-snapshots tbody tr", { hasText: "before-stop" });
  await snapRow.locator(".st", { hasText: /^ok$/ }).waitFor({ timeout: 90_000 });
  check(await notReloaded(), "the snapshot appeared without a reload");
  await noFailedToast();
  await toastDone("Snapshot VM web1").waitFor({ timeout: 30_000 });
  check((await badge(vmId).innerText()) === "up", "web1 still runs after a live snapshot");
  log("snapshot before-stop taken");
  await shot("vm-snapshot.png");

  // --- power it off: a destructive action asks first; cancel keeps it running.
  const off = page.locator(".toolbar button", { hasText: "Power off" });
  await off.click();
  await page.locator("dialog#confirm[open]").waitFor();
  check((await page.locator("dialog#confirm .confirm-text").innerText()).includes("Power off VM web1"), "the dialog names the VM");
  await page.click("#confirm-cancel");
  await page.waitForTimeout(2500);
  check((await badge(vmId).innerText()) === "up", "cancel keeps web1 running");
  await off.click();
  await page.locator("dialog#confirm[open]").waitFor();
  await shot("confirm.png");
  await page.click("#confirm-ok");
  await badge(vmId).filter({ hasText: /^down$/ }).waitFor({ timeout: 60_000 });
  check(await notReloaded(), "the status turned down without a reload");
  check(await page.locator(".toolbar button", { hasText: "Start" }).isVisible(), "Start shows again");
  log("web1 is down");
  await shot("vm-down.png");

  // --- copy web1's disk (a thin clone of the template: the copy collapses the chain).
  await page.click("header nav a:text-is('Disks')");
  await page.waitForURL(/\/portal\/disks$/);
  await markPage();
  const cf = page.locator("form[action$='/disks/copy']");
  const labels = await cf.locator("select[name=disk] option").evaluateAll((os) => os.map((o) => o.textContent));
  const web1Disk = labels.find((t) => t.startsWith("web1_"));
  check(!!web1Disk, `web1's disk is offered for copying: ${labels}`);
  await cf.locator("select[name=disk]").selectOption({ label: web1Disk });
  await cf.locator("select[name=sd]").selectOption({ label: "data" });
  await cf.locator("input[name=name]").fill("web1-copy");
  await cf.locator("button[type=submit]").click();
  await toastDone("Copy disk").waitFor({ timeout: 90_000 });
  await page.locator("#disks tbody tr", { hasText: "web1-copy" }).locator(".st", { hasText: /^ok$/ }).waitFor({ timeout: 30_000 });
  check(await notReloaded(), "the copy appeared without a reload");
  await noFailedToast();
  log("web1's disk copied as web1-copy");
  // The forms list the disks of the page's load (live updates leave forms alone).
  await page.reload();
  const ef = page.locator("form[action$='/disks/extend']");
  await ef.locator("select[name=disk]").selectOption({ label: "web1-copy" });
  await ef.locator("input[name=size_mib]").fill("48");
  await ef.locator("button[type=submit]").click();
  await toastDone("Extend disk web1-copy to 48 MiB").waitFor({ timeout: 60_000 });
  await page.locator("#disks tbody tr", { hasText: "web1-copy" }).filter({ hasText: "48 MiB" }).waitFor({ timeout: 30_000 });
  await noFailedToast();
  log("web1-copy extended to 48 MiB");
  await shot("disk-copy.png");

  // --- the jobs the portal started ended, with full progress bars.
  await page.click("header nav a:text-is('Jobs')");
  const rows = page.locator("#jobs-table tbody tr[data-job]");
  await rows.first().waitFor();
  const jobs = await rows.evaluateAll((trs) => trs.map((tr) => ({
    text: tr.innerText, status: tr.querySelector(".st").textContent,
    p: tr.querySelector("progress") && [tr.querySelector("progress").value, tr.querySelector("progress").max],
  })));
  check(jobs.length >= 5, `at least 5 jobs (got ${jobs.length})`);
  check(jobs.every((j) => j.status === "finished"), `all jobs finished: ${JSON.stringify(jobs)}`);
  check(jobs.some((j) => j.p && j.p[1] > 1 && j.p[0] === j.p[1]), "a multi-step job shows a full progress bar");
  await shot("jobs.png");
  await page.click("header nav a:text-is('Events')");
  check((await page.locator("table.events tbody tr").count()) > 0, "events are listed");
  for (const p of ["datacenters", "clusters", "hosts", "storagedomains", "disks", "snapshots"]) {
    const r = await page.goto(`${base}/portal/${p}`);
    check(r.status() === 200, `/portal/${p} answers 200`);
  }
  check((await page.locator("#snapshots tbody tr", { hasText: "before-stop" }).count()) === 1, "the snapshots page lists it");
  check(pageErrors.length === 0, `no script or CSP errors in the pages: ${pageErrors.join(" | ")}`);
  log("done");
} catch (e) {
  try { await page.screenshot({ path: join(screens, "failure.png"), fullPage: true }); } catch (_) { /* ignore */ }
  console.error(`FAILED at ${page.url()}: ${e.stack || e}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join(" | ")}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
