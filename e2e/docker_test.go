package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDockerImage builds the image with scripts/build-image.sh (no registry
// needed) and runs it the way the Helm chart does: non-root, read-only root
// filesystem, no capabilities, the token from a mounted file. It sends a
// message, checks /readyz and `mxq status`, stops the container with
// SIGTERM and starts it again: the message is still queued, in the volume.
func TestDockerImage(t *testing.T) {
	need(t, "docker")
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		if os.Getenv("MXQ_E2E") == "require" {
			t.Fatalf("docker daemon unreachable (MXQ_E2E=require): %v\n%s", err, out)
		}
		t.Skipf("docker daemon unreachable: %v", err)
	}
	unique := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano()%1e9)
	image := "mxq-e2e:" + unique
	name := "mxq-e2e-" + unique

	build := exec.Command("../scripts/build-image.sh")
	build.Env = append(os.Environ(), "MXQ_IMAGE="+image)
	var buildLog bytes.Buffer
	build.Stdout, build.Stderr = &buildLog, &buildLog
	start := time.Now()
	if err := build.Run(); err != nil {
		t.Fatalf("scripts/build-image.sh: %v\n%s", err, buildLog.String())
	}
	t.Cleanup(func() { imgDocker(t, "rmi", "-f", image) })
	t.Logf("image %s built in %v, %s", image, time.Since(start).Round(time.Second), imgDocker(t, "image", "inspect", "--format", "{{.Size}} bytes, user {{.Config.User}}", image))

	if got := imgDocker(t, "image", "inspect", "--format", `{{index .Config.Labels "org.opencontainers.image.source"}} {{.Config.User}} {{json .Config.Volumes}}`, image); got != `https://github.com/mxq-dev/mxq 65532:65532 {"/var/lib/mxq":{}}` {
		t.Errorf("image labels, user or volume: %s", got)
	}

	const token = "e2e-docker-token-0123456789"
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// As in Kubernetes: read-only root, all capabilities dropped; the
	// volume, /dev/shm and a /tmp tmpfs are the only writable places.
	imgDocker(t, "create", "--name", name, "--hostname", "mx-e2e",
		"--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
		"-p", "127.0.0.1::2525", "-p", "127.0.0.1::8025",
		"-v", tokenFile+":/etc/mxq/admin/token:ro",
		"-e", "MXQ_ADMIN_TOKEN_FILE=/etc/mxq/admin/token",
		"-e", "MXQ_SMTP_SHUTDOWN_GRACE=5s",
		image)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", "--tail", "40", name).CombinedOutput()
			t.Logf("container log (tail):\n%s", out)
		}
		imgDocker(t, "rm", "-f", "-v", name)
	})

	smtpAddr, adminURL := imgStart(t, name)
	c, err := dial(smtpAddr)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("From: alice@example.org\r\nTo: bob@example.test\r\nSubject: docker\r\n\r\nhello from the container test\r\n")
	id, err := sendOne(context.Background(), c, "alice@example.org", []string{"bob@example.test"}, msg)
	if err != nil {
		t.Fatalf("sending through the container: %v", err)
	}
	c.Quit()
	t.Logf("250, queued as %s", id)

	if code, body := imgGet(t, adminURL+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d %s", code, body)
	}
	out := imgStatus(t, adminURL, token)
	if !strings.Contains(out, "mx-e2e") || !strings.Contains(out, "1 messages") {
		t.Errorf("mxq status does not show node mx-e2e with 1 message:\n%s", out)
	}
	cmd := exec.Command(mxqBin, "status", "--server", adminURL, "--token", "wrong-token-0123456789")
	if b, err := cmd.CombinedOutput(); err == nil || cmd.ProcessState.ExitCode() != 3 {
		t.Errorf("a wrong token: exit %d, want 3 (the server uses the mounted token file)\n%s", cmd.ProcessState.ExitCode(), b)
	}

	// SIGTERM: a clean stop well within the grace period; then the same
	// volume on the next start.
	stopped := time.Now()
	imgDocker(t, "stop", "--time", "30", name)
	if took := time.Since(stopped); took > 20*time.Second {
		t.Errorf("docker stop took %v: SIGTERM was not handled promptly", took)
	}
	if code := imgDocker(t, "inspect", "--format", "{{.State.ExitCode}}", name); code != "0" {
		t.Errorf("exit code %s after SIGTERM, want 0", code)
	}
	_, adminURL = imgStart(t, name)
	if out := imgStatus(t, adminURL, token); !strings.Contains(out, "1 messages") {
		t.Errorf("after a restart the message is gone:\n%s", out)
	}
}

// imgStart starts it and waits for the SMTP greeting; it returns the
// published SMTP address and admin URL (ports change on every start).
func imgStart(t *testing.T, name string) (smtpAddr, adminURL string) {
	t.Helper()
	imgDocker(t, "start", name)
	smtpAddr = imgDocker(t, "port", name, "2525/tcp")
	adminURL = "http://" + imgDocker(t, "port", name, "8025/tcp")
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := dial(smtpAddr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no SMTP greeting on %s: %v", smtpAddr, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return smtpAddr, adminURL
}

func imgStatus(t *testing.T, adminURL, token string) string {
	t.Helper()
	cmd := exec.Command(mxqBin, "status", "--server", adminURL)
	cmd.Env = append(os.Environ(), "MXQ_ADMIN_TOKEN="+token)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("mxq status: %v\n%s", err, out)
	}
	return string(out)
}

func imgGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// imgDocker runs a docker command and returns its trimmed output (the first
// line for `docker port`, which lists IPv4 and IPv6 bindings).
func imgDocker(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	s := strings.TrimSpace(string(out))
	if args[0] == "port" {
		s, _, _ = strings.Cut(s, "\n")
	}
	return s
}
