//! `init`: owns the agent's link-local addresses through netlink.
//!
//! Semantics of the reference agent (docs/architecture.md §7), kept: link `pod-id-link0`,
//! one host address per served IP, link up, a host route per address on that
//! link in the main table; what exists and is right is left alone; a route to
//! an address on a different link is an error; IPv6 failures are warnings.
//! Added: every conflict is found before anything changes, IPv6 addresses
//! skip duplicate-address detection (usable at once), a fallback link kind
//! for kernels without `dummy`, and `remove` to undo exactly this.

use std::{fmt, net::IpAddr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkBridge, LinkDummy, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
    packet_core::ErrorMessage,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope},
    },
};
use thiserror::Error;
use tracing::{info, warn};

/// The link kinds `init` can create. `dummy` is the reference's; the
/// others behave the same for local addresses on kernels without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkKind {
    /// `dummy`, falling back to `bridge` where the kernel has no dummy driver.
    Auto,
    Dummy,
    /// A bridge without ports: up, carrier on, never forwards anything.
    Bridge,
    Ifb,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkKind::Auto => "auto",
            LinkKind::Dummy => "dummy",
            LinkKind::Bridge => "bridge",
            LinkKind::Ifb => "ifb",
        })
    }
}

/// A kind a link can actually be created as (what `auto` resolves to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Concrete {
    Dummy,
    Bridge,
    Ifb,
}

impl Concrete {
    fn kind(self) -> LinkKind {
        match self {
            Concrete::Dummy => LinkKind::Dummy,
            Concrete::Bridge => LinkKind::Bridge,
            Concrete::Ifb => LinkKind::Ifb,
        }
    }
}

/// What `init` should own.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub kind: LinkKind,
}

/// Errors of the netlink boundary, each saying what to do about it.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("opening a netlink socket failed: {0}")]
    Socket(#[source] std::io::Error),
    #[error(
        "{what}: permission denied by the kernel ({errno}); init needs CAP_NET_ADMIN in the node's network namespace"
    )]
    Permission { what: String, errno: std::io::Error },
    #[error("{what}: the kernel refused: {errno}")]
    Kernel { what: String, errno: std::io::Error },
    #[error("{what}: netlink failed: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: the kernel acknowledged but the link is not there")]
    Vanished { what: String },
    #[error(
        "a route to {address} already exists on link {link} (index {index}); remove it or choose other --bind-hosts (nothing was changed)"
    )]
    RouteConflict {
        address: IpAddr,
        link: String,
        index: u32,
    },
    #[error(
        "address {address} is already assigned to link {link} (index {index}); remove it there first (nothing was changed)"
    )]
    AddressConflict {
        address: IpAddr,
        link: String,
        index: u32,
    },
    #[error(
        "link {name} exists but is a {found} link, not one init creates; refusing to remove it"
    )]
    NotOurs { name: String, found: String },
    #[error(
        "no link kind could be created for {name}: dummy is missing ({dummy}) and so is bridge ({bridge})"
    )]
    NoLinkKind {
        name: String,
        dummy: String,
        bridge: String,
    },
}

impl LinkError {
    fn from_netlink(what: impl Into<String>, err: rtnetlink::Error) -> LinkError {
        let what = what.into();
        match err {
            rtnetlink::Error::NetlinkError(msg) => from_errno(what, &msg),
            source => LinkError::Netlink { what, source },
        }
    }

    fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Permission { errno, .. } | LinkError::Kernel { errno, .. } => {
                errno.raw_os_error()
            }
            _ => None,
        }
    }
}

fn from_errno(what: String, msg: &ErrorMessage) -> LinkError {
    let errno = msg.to_io();
    match errno.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => LinkError::Permission { what, errno },
        _ => LinkError::Kernel { what, errno },
    }
}

/// What `init` did (for logs and tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InitReport {
    /// The kind of link created, if it had to be created.
    pub created: Option<LinkKind>,
    pub set_up: bool,
    pub added_addresses: Vec<IpAddr>,
    pub added_routes: Vec<IpAddr>,
    /// IPv6 steps that failed (IPv6 disabled): logged, not fatal.
    pub warnings: Vec<String>,
}

impl InitReport {
    pub fn changed(&self) -> bool {
        self.created.is_some()
            || self.set_up
            || !self.added_addresses.is_empty()
            || !self.added_routes.is_empty()
    }
}

/// A netlink session in the caller's network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket; must be called inside a tokio runtime.
    pub fn connect() -> Result<Netlink, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Creates or completes the link, its addresses and routes.
    pub async fn init(&self, spec: &LinkSpec) -> Result<InitReport, LinkError> {
        let mut report = InitReport::default();
        let existing = self.link_by_name(&spec.name).await?;
        let own_index = existing.as_ref().map(|l| l.header.index);
        // Every conflict first, so a refusal changes nothing.
        for &address in &spec.addresses {
            self.check_conflicts(address, own_index).await?;
        }

        let link = match existing {
            Some(link) => link,
            None => {
                let kind = self.create_link(&spec.name, spec.kind).await?;
                report.created = Some(kind);
                self.link_by_name(&spec.name)
                    .await?
                    .ok_or_else(|| LinkError::Vanished {
                        what: format!("creating link {}", spec.name),
                    })?
            }
        };
        let index = link.header.index;
        if !link.header.flags.contains(LinkFlags::Up) {
            let up = LinkUnspec::new_with_index(index).up().build();
            self.handle.link().set(up).execute().await.map_err(|e| {
                LinkError::from_netlink(format!("setting link {} up", spec.name), e)
            })?;
            report.set_up = true;
        }

        for &address in &spec.addresses {
            match self
                .ensure_address_and_route(index, address, &mut report)
                .await
            {
                Ok(()) => {}
                Err(e) if address.is_ipv6() => {
                    warn!(%address, error = %e, "IPv6 setup failed (IPv6 disabled?); continuing with IPv4");
                    report.warnings.push(format!("{address}: {e}"));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Removes the link `init` created (its addresses and routes go with it).
    /// Returns whether there was anything to remove.
    pub async fn remove(&self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        let kind = link_kind(&link);
        let ours = matches!(
            kind,
            Some(InfoKind::Dummy) | Some(InfoKind::Bridge) | Some(InfoKind::Ifb)
        );
        if !ours {
            return Err(LinkError::NotOurs {
                name: name.to_owned(),
                found: kind.map_or_else(|| "device".to_owned(), |k| k.to_string()),
            });
        }
        if matches!(kind, Some(InfoKind::Bridge)) && self.has_ports(link.header.index).await? {
            return Err(LinkError::NotOurs {
                name: name.to_owned(),
                found: "bridge with ports".to_owned(),
            });
        }
        self.handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(|e| LinkError::from_netlink(format!("deleting link {name}"), e))?;
        Ok(true)
    }

    /// The served addresses that are not assigned to any local link.
    pub async fn missing_addresses(&self, addresses: &[IpAddr]) -> Result<Vec<IpAddr>, LinkError> {
        let assigned: Vec<IpAddr> = self
            .addresses(None)
            .await?
            .iter()
            .filter_map(address_of)
            .collect();
        Ok(addresses
            .iter()
            .copied()
            .filter(|a| !assigned.contains(a))
            .collect())
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code().abs() == libc::ENODEV => {
                Ok(None)
            }
            Err(e) => Err(LinkError::from_netlink(
                format!("looking up link {name}"),
                e,
            )),
        }
    }

    /// The name of the link with `index`, for messages (`#index` if gone).
    async fn name_of_index(&self, index: u32) -> String {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => name_of(&link).unwrap_or_else(|| format!("#{index}")),
            _ => format!("#{index}"),
        }
    }

    async fn has_ports(&self, bridge_index: u32) -> Result<bool, LinkError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| LinkError::from_netlink("listing links", e))?;
        Ok(links.iter().any(|l| {
            l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(i) if *i == bridge_index))
        }))
    }

    async fn create_link(&self, name: &str, kind: LinkKind) -> Result<LinkKind, LinkError> {
        match kind {
            LinkKind::Auto => match self.create_concrete(name, Concrete::Dummy).await {
                Ok(k) => Ok(k),
                Err(dummy) if is_unsupported_kind(&dummy) => {
                    match self.create_concrete(name, Concrete::Bridge).await {
                        Ok(k) => {
                            warn!(
                                link = name,
                                "kernel has no dummy driver; created a port-less bridge instead"
                            );
                            Ok(k)
                        }
                        Err(bridge) if is_unsupported_kind(&bridge) => Err(LinkError::NoLinkKind {
                            name: name.to_owned(),
                            dummy: dummy.to_string(),
                            bridge: bridge.to_string(),
                        }),
                        Err(bridge) => Err(bridge),
                    }
                }
                Err(dummy) => Err(dummy),
            },
            LinkKind::Dummy => self.create_concrete(name, Concrete::Dummy).await,
            LinkKind::Bridge => self.create_concrete(name, Concrete::Bridge).await,
            LinkKind::Ifb => self.create_concrete(name, Concrete::Ifb).await,
        }
    }

    /// Creates a link of a concrete kind (`auto` is `create_link`'s choice).
    async fn create_concrete(&self, name: &str, concrete: Concrete) -> Result<LinkKind, LinkError> {
        let kind = concrete.kind();
        let message = match concrete {
            Concrete::Dummy => LinkDummy::new(name).build(),
            Concrete::Bridge => LinkBridge::new(name).build(),
            Concrete::Ifb => LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Ifb)
                .name(name.to_owned())
                .build(),
        };
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| LinkError::from_netlink(format!("creating {kind} link {name}"), e))?;
        info!(link = name, %kind, "created link");
        Ok(kind)
    }

    /// Refuses an address that is already routed or assigned elsewhere.
    async fn check_conflicts(&self, address: IpAddr, own: Option<u32>) -> Result<(), LinkError> {
        for route in self.host_routes(address).await? {
            if let Some(oif) = route_oif(&route)
                && Some(oif) != own
            {
                return Err(LinkError::RouteConflict {
                    address,
                    link: self.name_of_index(oif).await,
                    index: oif,
                });
            }
        }
        for msg in self.addresses(Some(address)).await? {
            if Some(msg.header.index) != own {
                return Err(LinkError::AddressConflict {
                    address,
                    link: self.name_of_index(msg.header.index).await,
                    index: msg.header.index,
                });
            }
        }
        Ok(())
    }

    async fn ensure_address_and_route(
        &self,
        index: u32,
        address: IpAddr,
        report: &mut InitReport,
    ) -> Result<(), LinkError> {
        let full = full_prefix(address);
        let present = self
            .addresses(Some(address))
            .await?
            .iter()
            .any(|m| m.header.index == index);
        if !present {
            let mut request = self.handle.address().add(index, address, full);
            if address.is_ipv6() {
                // Usable at once: no duplicate-address detection delay.
                let message = request.message_mut();
                message.header.flags |= AddressHeaderFlags::Nodad;
                message
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request.execute().await.map_err(|e| {
                LinkError::from_netlink(format!("adding address {address}/{full}"), e)
            })?;
            info!(%address, "added address");
            report.added_addresses.push(address);
        }
        let routed = self
            .host_routes(address)
            .await?
            .iter()
            .any(|r| route_oif(r) == Some(index));
        if !routed {
            let route = host_route(address, index);
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|e| {
                    LinkError::from_netlink(format!("adding route {address}/{full}"), e)
                })?;
            info!(%address, "added route");
            report.added_routes.push(address);
        }
        Ok(())
    }

    /// Assigned addresses, all or only `address`.
    pub async fn addresses(
        &self,
        address: Option<IpAddr>,
    ) -> Result<Vec<AddressMessage>, LinkError> {
        let all: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| LinkError::from_netlink("listing addresses", e))?;
        Ok(all
            .into_iter()
            .filter(|m| address.is_none() || address_of(m) == address)
            .collect())
    }

    /// Main-table routes whose destination is exactly `address` (/32, /128).
    pub async fn host_routes(&self, address: IpAddr) -> Result<Vec<RouteMessage>, LinkError> {
        let query = match address {
            IpAddr::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let routes: Vec<RouteMessage> =
            match self.handle.route().get(query).execute().try_collect().await {
                Ok(r) => r,
                // No IPv6 in this namespace: no IPv6 routes either.
                Err(rtnetlink::Error::NetlinkError(m))
                    if address.is_ipv6() && m.raw_code().abs() == libc::EAFNOSUPPORT =>
                {
                    Vec::new()
                }
                Err(e) => return Err(LinkError::from_netlink("listing routes", e)),
            };
        Ok(routes
            .into_iter()
            .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .filter(|r| r.header.destination_prefix_length == full_prefix(address))
            .filter(|r| route_destination(r) == Some(address))
            .collect())
    }
}

fn is_unsupported_kind(err: &LinkError) -> bool {
    // "Unknown device type": the kernel has no driver for the kind.
    matches!(err.errno(), Some(libc::EOPNOTSUPP))
}

fn full_prefix(address: IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

/// `ADDR/32 dev LINK scope link` (or /128) in the main table.
fn host_route(address: IpAddr, index: u32) -> RouteMessage {
    match address {
        IpAddr::V4(v4) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .output_interface(index)
            .build(),
    }
}

pub fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the local address on point-to-point links; prefer it.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

pub fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

fn route_destination(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

pub fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

pub fn link_kind(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}
