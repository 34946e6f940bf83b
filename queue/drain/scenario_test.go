package drain

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mxq-dev/mxq/internal/testbackend"
	"github.com/mxq-dev/mxq/internal/teststore"
	"github.com/mxq-dev/mxq/queue"
	"github.com/mxq-dev/mxq/queue/delivery"
	"github.com/mxq-dev/mxq/queue/envelope"
)

// The drain scenarios of the "protect the store" promise, against a real
// LMTP store of limited capacity (internal/testbackend): it serves at most C
// deliveries/s and K connections, slows down when pushed harder and then
// answers 451/421. They take a minute or so in all; -short skips them.

// backlog enqueues n messages from many concurrent writers (the group
// committer makes that quick) and returns their queue IDs.
func backlog(t testing.TB, st *queue.Store, n int) map[string]bool {
	t.Helper()
	ids := envelope.NewIDGen(time.Now, 21)
	want := make(map[string]bool, n)
	var mu sync.Mutex
	work := make(chan int, n)
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	errs := make(chan error, 128)
	for w := 0; w < 128; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				env := &envelope.Envelope{ID: ids.New(), From: "a@example.org", To: []string{fmt.Sprintf("u%d@example.test", i%100)}, Arrived: time.Now().UTC()}
				msg := fmt.Sprintf("Received: from x ([127.0.0.1])\r\n\tby mx (mxq) with ESMTP id %s;\r\n\tdate\r\nSubject: %d\r\n\r\n%s\r\n", env.ID, i, strings.Repeat("body ", 200))
				if err := st.Enqueue(context.Background(), env, strings.NewReader(msg)); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				want[env.ID] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return want
}

// scenarioLogger shows the drain's log (every change of pace and why) when
// MXQ_SCENARIO_SERIES is set, to see what a slow run was doing.
func scenarioLogger() *slog.Logger {
	if os.Getenv("MXQ_SCENARIO_SERIES") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil))
}

type scenario struct {
	name     string
	messages int
	capacity float64
	conns    int
	// during runs while the drain is under way, after the store is up.
	during func(t testing.TB, be *testbackend.Server, done func() bool)
	// optimal is the drain time of an oracle that knows the store's
	// capacity at every moment; 0 means messages / capacity.
	optimal time.Duration
	// maxRatio bounds drain time / optimal; 0: not checked.
	maxRatio float64
	// maxDups bounds the duplicates: 0 where no fault cuts a delivery
	// between the store's acceptance and its reply reaching the drain.
	maxDups int
}

// result is what a scenario measured.
type result struct {
	elapsed, optimal time.Duration
	overloadShare    float64
	lost, dups       int
}

func (r result) ratio() float64 { return r.elapsed.Seconds() / r.optimal.Seconds() }

// runScenario runs sc and checks the promises that hold in every scenario:
// nothing lost, overload replies at most 1%, connections within ceilings.
func runScenario(t testing.TB, sc scenario) result {
	if testing.Short() {
		t.Skip("drain scenarios take a minute")
	}
	st := testStore(t)
	be, err := testbackend.Start("127.0.0.1:0", testbackend.Options{Capacity: testbackend.Capacity{Rate: sc.capacity, Conns: sc.conns}})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	be.Down()
	want := backlog(t, st, sc.messages)

	cl := delivery.New(delivery.Options{Protocol: "lmtp", Address: be.Addr(), MaxIdle: 16, ConnectTimeout: time.Second, CommandTimeout: 10 * time.Second})
	defer cl.Close()
	d := New(st, teststore.Catalog(t, st, nil), Options{
		// Ceilings well above the store's capacity: the ramp must find it.
		Routes:        []Route{{Name: "store", Deliverer: cl, Ramp: DefaultRamp(4*sc.capacity, 2*sc.conns)}},
		RetryMin:      time.Second,
		RetryMax:      5 * time.Second,
		MaxLifetime:   time.Hour,
		ProbeInterval: 200 * time.Millisecond,
		PollInterval:  50 * time.Millisecond,
		Logger:        scenarioLogger(),
	})
	ctx, cancel := context.WithCancel(context.Background())
	drained := make(chan struct{})
	go func() { d.Run(ctx); close(drained) }()
	defer func() { cancel(); <-drained }()

	// The store is down while the backlog waits: the circuit opens.
	waitFor(t, "circuit open", 10*time.Second, func() bool { return d.State()[0].Circuit == "open" })
	if err := be.Up(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	allIn := func() bool { return be.Stats().Accepted >= sc.messages }
	if sc.during != nil {
		sc.during(t, be, allIn)
	}
	waitFor(t, "backlog delivered", 5*time.Minute, allIn)
	elapsed := time.Since(start)
	time.Sleep(500 * time.Millisecond) // stragglers would be duplicates

	seen := map[string]int{}
	for _, dl := range be.Deliveries() {
		seen[dl.QueueID]++
	}
	lost, dups := 0, 0
	for id := range want {
		switch n := seen[id]; {
		case n == 0:
			lost++
		case n > 1:
			dups += n - 1
		}
	}
	stats := be.Stats()
	attempts := stats.Accepted + stats.Overloads()
	share := float64(stats.Overloads()) / float64(attempts)
	optimal := sc.optimal
	if optimal == 0 {
		optimal = time.Duration(float64(sc.messages) / sc.capacity * float64(time.Second))
	}
	ratio := elapsed.Seconds() / optimal.Seconds()
	rs := d.State()[0]
	t.Logf("%s: %d messages drained in %v (optimal %v, ratio %.2f); overload replies %d of %d attempts (%.2f%%: %d×451, %d×421); slowed %d, max delay %v; lost %d, duplicates %d; final rate %.0f/s, concurrency %d",
		sc.name, sc.messages, elapsed.Round(10*time.Millisecond), optimal, ratio, stats.Overloads(), attempts, 100*share,
		stats.Refused451, stats.Refused421, stats.Slowed, stats.MaxDelay, lost, dups, rs.Ramp.Rate, rs.Ramp.Concurrency)
	if os.Getenv("MXQ_SCENARIO_SERIES") != "" {
		t.Logf("accepted per second: %v", be.PerSecond())
	}
	if lost != 0 {
		t.Errorf("%d messages lost", lost)
	}
	if dups > sc.maxDups {
		t.Errorf("%d duplicates, want at most %d", dups, sc.maxDups)
	}
	if share > 0.01 {
		t.Errorf("overload share %.2f%% > 1%%", 100*share)
	}
	if sc.maxRatio > 0 && ratio > sc.maxRatio {
		t.Errorf("drain took %.2f× the optimal time, want ≤ %.1f×", ratio, sc.maxRatio)
	}
	if stats.MaxConns > 2*sc.conns {
		t.Errorf("%d connections at once, ceiling %d", stats.MaxConns, 2*sc.conns)
	}
	return result{elapsed: elapsed, optimal: optimal, overloadShare: share, lost: lost, dups: dups}
}

// The core scenario: 20 000 messages wait while the store is down, then
// the store comes back able to take 500 msg/s over 8 connections.
func TestScenarioRecovery(t *testing.T) {
	runScenario(t, scenario{name: "recovery", messages: 20000, capacity: 500, conns: 8, maxRatio: 1.2})
}

// The store goes down and comes back three times during the drain.
func TestScenarioFlapping(t *testing.T) {
	runScenario(t, scenario{name: "flapping", messages: 10000, capacity: 500, conns: 8,
		// The store is down 3 × 2 s of the drain.
		// Each return restarts the ramp from the bottom, by design.
		optimal: 10000/500*time.Second + 6*time.Second, maxRatio: 1.4,
		// Each time the store goes down it cuts the deliveries in flight;
		// one the store had taken but not yet answered is sent again
		// (at least once): at most one per connection per cut.
		maxDups: 3 * 2 * 8,
		during: func(t testing.TB, be *testbackend.Server, done func() bool) {
			for i := 0; i < 3 && !done(); i++ {
				time.Sleep(3 * time.Second)
				be.Down()
				time.Sleep(2 * time.Second)
				if err := be.Up(); err != nil {
					t.Error(err)
					return
				}
			}
		}})
}

// Half-way, the store's capacity halves: the ramp follows it down.
func TestScenarioCapacityHalves(t *testing.T) {
	runScenario(t, scenario{name: "capacity halves", messages: 10000, capacity: 500, conns: 8,
		optimal: 5000/500*time.Second + 5000/250*time.Second, maxRatio: 1.2,
		during: func(t testing.TB, be *testbackend.Server, done func() bool) {
			for be.Stats().Accepted < 5000 && !done() {
				time.Sleep(50 * time.Millisecond)
			}
			be.SetCapacity(250, 8)
		}})
}

// BenchmarkDrainRecovery is the recovery scenario at scale: 100 000
// messages (MXQ_DRAIN_MESSAGES to change) wait for a store that comes back
// with 500 msg/s and 8 connections. It reports drain time / optimal time
// and the overload share. About four minutes:
//
//	go test -run - -bench DrainRecovery -benchtime 1x -timeout 30m ./queue/drain
func BenchmarkDrainRecovery(b *testing.B) {
	n := 100000
	if s := os.Getenv("MXQ_DRAIN_MESSAGES"); s != "" {
		fmt.Sscan(s, &n)
	}
	for i := 0; i < b.N; i++ {
		r := runScenario(b, scenario{name: "recovery", messages: n, capacity: 500, conns: 8})
		b.ReportMetric(r.ratio(), "drain/optimal")
		b.ReportMetric(100*r.overloadShare, "overload%")
		b.ReportMetric(float64(r.lost), "lost")
		b.ReportMetric(float64(r.dups), "duplicates")
	}
}
